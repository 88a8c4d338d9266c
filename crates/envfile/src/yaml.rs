//! YAML text -> located value tree.
//!
//! Built on `saphyr-parser`'s event stream (it gives every event its span and bounds its own
//! recursion). Plain scalars are resolved with the YAML 1.2 core schema (`yes` is a string, not a
//! boolean). Aliases are expanded, within [`MAX_NODES`] for the whole file. Only one document is
//! accepted; keys must be scalars and unique.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::diag::{Diagnostics, Pos};
use crate::tree::{Entry, MAX_NODES, Node, Value};

fn pos_of(span: &Span) -> Pos {
    Pos::new(span.start.line(), span.start.col() + 1)
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<Entry>,
        key: Option<(String, Pos)>,
    },
}

/// Parses `text` into one tree. Syntax errors are reported to `diags` and give `None`.
pub(crate) fn parse(text: &str, diags: &mut Diagnostics) -> Option<Node> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut nodes = 0usize;
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut ok = true;

    while let Some(event) = parser.next_event() {
        let (event, span) = match event {
            Ok(e) => e,
            Err(err) => {
                let m = err.marker();
                diags.error(
                    Pos::new(m.line(), m.col() + 1),
                    format!("invalid YAML: {}", err.info()),
                );
                return None;
            }
        };
        let pos = pos_of(&span);
        let finished: Option<(Node, usize)> = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    diags.error(
                        pos,
                        "a second YAML document (`---`): an environment file holds exactly one",
                    );
                    return None;
                }
                None
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => None,
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq {
                    pos,
                    anchor,
                    items: Vec::new(),
                });
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => Some((
                    Node {
                        value: Value::Seq(items),
                        pos,
                    },
                    anchor,
                )),
                _ => unreachable_structure(diags, pos),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => Some((
                    Node {
                        value: Value::Map(entries),
                        pos,
                    },
                    anchor,
                )),
                _ => unreachable_structure(diags, pos),
            },
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = tag
                    .as_ref()
                    .is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                Some((Node { value, pos }, anchor))
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(node) => {
                    let mut copy = node.clone();
                    copy.pos = pos;
                    Some((copy, 0))
                }
                None => {
                    diags.error(pos, "alias refers to an unknown anchor");
                    return None;
                }
            },
        };

        let Some((node, anchor)) = finished else {
            continue;
        };
        nodes += node.size();
        if nodes > MAX_NODES {
            diags.error(
                pos,
                format!("the file expands to more than {MAX_NODES} values (too many aliases?)"),
            );
            return None;
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => match scalar_key(&node.value) {
                    Some(k) => *key = Some((k, node.pos)),
                    None => {
                        diags.error(
                            node.pos,
                            "a key must be a plain string, not a list or mapping",
                        );
                        ok = false;
                        *key = Some((String::new(), node.pos));
                    }
                },
                Some((k, key_pos)) => {
                    if let Some(first) = entries.iter().find(|e| e.key == k) {
                        diags.error(
                            key_pos,
                            format!(
                                "duplicate key `{k}` (first defined at line {})",
                                first.key_pos.line
                            ),
                        );
                        ok = false;
                    } else {
                        entries.push(Entry {
                            key: k,
                            key_pos,
                            value: node,
                        });
                    }
                }
            },
        }
    }
    if !ok {
        return None;
    }
    Some(root.unwrap_or(Node {
        value: Value::Null,
        pos: Pos::START,
    }))
}

fn unreachable_structure(diags: &mut Diagnostics, pos: Pos) -> Option<(Node, usize)> {
    // The parser guarantees balanced start/end events; report rather than panic if it ever
    // does not.
    diags.error(pos, "invalid YAML: unbalanced structure");
    None
}

fn scalar_key(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        Value::Number { raw, .. } => Some(raw.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        Value::Seq(_) | Value::Map(_) => None,
    }
}

/// Resolves a plain scalar with the YAML 1.2 core schema.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(int) = parse_int(s) {
        return Value::Number {
            raw: s.to_owned(),
            int,
        };
    }
    if is_float(s) {
        return Value::Number {
            raw: s.to_owned(),
            int: None,
        };
    }
    Value::Str(s.to_owned())
}

/// `Some(Some(n))` for an integer that fits, `Some(None)` for one that does not, `None` for text
/// that is not an integer at all.
fn parse_int(s: &str) -> Option<Option<i64>> {
    let digits = |t: &str, radix: u32| !t.is_empty() && t.chars().all(|c| c.is_digit(radix));
    if let Some(hex) = s.strip_prefix("0x") {
        return digits(hex, 16).then(|| i64::from_str_radix(hex, 16).ok());
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return digits(oct, 8).then(|| i64::from_str_radix(oct, 8).ok());
    }
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    digits(unsigned, 10).then(|| s.parse::<i64>().ok())
}

fn is_float(s: &str) -> bool {
    let t = s.strip_prefix(['-', '+']).unwrap_or(s);
    if matches!(t, ".inf" | ".Inf" | ".INF") || matches!(s, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((a, b)) => {
            (!a.is_empty() || !b.is_empty())
                && a.chars().all(|c| c.is_ascii_digit())
                && b.chars().all(|c| c.is_ascii_digit())
        }
        None => !mantissa.is_empty() && mantissa.chars().all(|c| c.is_ascii_digit()),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Node {
        let mut d = Diagnostics::new("t.yml");
        let node = parse(text, &mut d);
        assert!(!d.has_errors(), "{:?}", d.errors);
        node.unwrap()
    }

    #[test]
    fn core_schema_resolution() {
        assert_eq!(resolve_plain("yes"), Value::Str("yes".into()));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("TRUE"), Value::Bool(true));
        assert!(matches!(
            resolve_plain("0x1F"),
            Value::Number { int: Some(31), .. }
        ));
        assert!(matches!(
            resolve_plain("-12"),
            Value::Number { int: Some(-12), .. }
        ));
        assert!(matches!(
            resolve_plain("1.10"),
            Value::Number { int: None, .. }
        ));
        assert!(matches!(
            resolve_plain("1e3"),
            Value::Number { int: None, .. }
        ));
        assert_eq!(resolve_plain("1.2.3"), Value::Str("1.2.3".into()));
        assert_eq!(resolve_plain("."), Value::Str(".".into()));
        assert_eq!(resolve_plain("8GiB"), Value::Str("8GiB".into()));
    }

    #[test]
    fn positions_are_one_based() {
        let root = parse_ok("a: 1\nb:\n  - x\n");
        let Value::Map(entries) = root.value else {
            panic!()
        };
        assert_eq!(entries[1].key_pos, Pos::new(2, 1));
        let Value::Seq(items) = &entries[1].value.value else {
            panic!()
        };
        assert_eq!(items[0].pos, Pos::new(3, 5));
    }

    #[test]
    fn quoted_and_tagged_scalars_stay_strings() {
        let root = parse_ok("a: '1'\nb: !!str true\n");
        let Value::Map(entries) = root.value else {
            panic!()
        };
        assert_eq!(entries[0].value.value, Value::Str("1".into()));
        assert_eq!(entries[1].value.value, Value::Str("true".into()));
    }

    #[test]
    fn aliases_expand_and_are_bounded() {
        let root = parse_ok("a: &x [1, 2]\nb: *x\n");
        let Value::Map(entries) = root.value else {
            panic!()
        };
        assert_eq!(entries[0].value.value, entries[1].value.value);

        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let mut d = Diagnostics::new("t.yml");
        assert!(parse(&bomb, &mut d).is_none());
        assert!(d.errors[0].message.contains("more than"), "{:?}", d.errors);
    }

    #[test]
    fn duplicate_keys_and_second_documents_are_errors() {
        let mut d = Diagnostics::new("t.yml");
        assert!(parse("a: 1\na: 2\n", &mut d).is_none());
        assert_eq!(
            d.errors[0].message,
            "duplicate key `a` (first defined at line 1)"
        );
        assert_eq!(d.errors[0].line, 2);

        let mut d = Diagnostics::new("t.yml");
        assert!(parse("a: 1\n---\nb: 2\n", &mut d).is_none());
        assert_eq!(d.errors[0].line, 2);
    }

    #[test]
    fn empty_text_is_null() {
        assert_eq!(parse_ok("").value, Value::Null);
        assert_eq!(parse_ok("# only a comment\n").value, Value::Null);
    }
}
