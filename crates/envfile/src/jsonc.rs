//! JSON with comments (the dialect of `devcontainer.json`) -> located value tree.
//!
//! Uses `jsonc-parser` with the options VS Code's own reader allows: `//` and `/* */` comments and
//! trailing commas, nothing looser (no single quotes, no bare words, no hex numbers). The parser
//! bounds nesting depth itself. Duplicate keys are errors: the last one would silently win.

use jsonc_parser::ast;
use jsonc_parser::{CollectOptions, CommentCollectionStrategy, ParseOptions, parse_to_ast};

use crate::diag::{Diagnostics, LineIndex, Pos};
use crate::tree::{Entry, Node, Value};

pub(crate) fn parse(text: &str, diags: &mut Diagnostics) -> Option<Node> {
    let options = ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        ..ParseOptions::default()
    };
    let collect = CollectOptions {
        comments: CommentCollectionStrategy::Off,
        tokens: false,
    };
    let index = LineIndex::new(text);
    let parsed = match parse_to_ast(text, &collect, &options) {
        Ok(p) => p,
        Err(err) => {
            let pos = index.pos(err.range().start);
            diags.error(pos, format!("invalid JSON: {}", err.kind()));
            return None;
        }
    };
    let Some(value) = parsed.value else {
        diags.error(
            Pos::START,
            "the file is empty: expected a JSON object such as {\"image\": \"debian:bookworm\"}",
        );
        return None;
    };
    let mut ok = true;
    let node = convert(&value, &index, diags, &mut ok);
    ok.then_some(node)
}

fn convert(
    v: &ast::Value<'_>,
    index: &LineIndex<'_>,
    diags: &mut Diagnostics,
    ok: &mut bool,
) -> Node {
    let (value, start) = match v {
        ast::Value::StringLit(s) => (Value::Str(s.value.to_string()), s.range.start),
        ast::Value::NumberLit(n) => (
            Value::Number {
                raw: n.value.to_owned(),
                int: n.value.parse().ok(),
            },
            n.range.start,
        ),
        ast::Value::BooleanLit(b) => (Value::Bool(b.value), b.range.start),
        ast::Value::NullKeyword(n) => (Value::Null, n.range.start),
        ast::Value::Array(a) => (
            Value::Seq(
                a.elements
                    .iter()
                    .map(|e| convert(e, index, diags, ok))
                    .collect(),
            ),
            a.range.start,
        ),
        ast::Value::Object(o) => {
            let mut entries: Vec<Entry> = Vec::with_capacity(o.properties.len());
            for prop in &o.properties {
                let key = prop.name.as_str().to_owned();
                let key_pos = index.pos(prop.range.start);
                let value = convert(&prop.value, index, diags, ok);
                if let Some(first) = entries.iter().find(|e| e.key == key) {
                    diags.error(
                        key_pos,
                        format!(
                            "duplicate key \"{key}\" (first defined at line {})",
                            first.key_pos.line
                        ),
                    );
                    *ok = false;
                    continue;
                }
                entries.push(Entry {
                    key,
                    key_pos,
                    value,
                });
            }
            (Value::Map(entries), o.range.start)
        }
    };
    Node {
        value,
        pos: index.pos(start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas_are_accepted() {
        let mut d = Diagnostics::new("devcontainer.json");
        let text = "{\n  // a comment\n  \"a\": [1, 2,], /* more */\n  \"b\": \"x\",\n}\n";
        let node = parse(text, &mut d).unwrap();
        let Value::Map(entries) = node.value else {
            panic!()
        };
        assert_eq!(entries[0].key_pos, Pos::new(3, 3));
        assert_eq!(entries[1].value.value, Value::Str("x".into()));
    }

    #[test]
    fn errors_have_positions() {
        let mut d = Diagnostics::new("devcontainer.json");
        assert!(parse("{\n  \"a\": 'x'\n}", &mut d).is_none());
        assert_eq!((d.errors[0].line, d.errors[0].column), (2, 8));

        let mut d = Diagnostics::new("devcontainer.json");
        assert!(parse("{\"a\": 1, \"a\": 2}", &mut d).is_none());
        assert!(d.errors[0].message.starts_with("duplicate key"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut d = Diagnostics::new("devcontainer.json");
        assert!(parse(&text, &mut d).is_none());
        assert!(d.has_errors());
    }
}
