//! Words of a Dockerfile line: splitting (quotes kept, so expansion knows what was quoted) and
//! build-time expansion of `$VAR`, `${VAR}`, `${VAR:-default}` and `${VAR:+alternative}` with
//! quote removal, as Docker's shell lexer does.

/// Splits `text` into words at unquoted whitespace. Quotes and escapes stay in the words.
pub fn split_words(text: &str, escape: char) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                } else if c == escape
                    && q == '"'
                    && let Some(next) = chars.next()
                {
                    word.push(next);
                }
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                in_word = true;
                word.push(c);
                if c == '"' || c == '\'' {
                    quote = Some(c);
                } else if c == escape
                    && let Some(next) = chars.next()
                {
                    word.push(next);
                }
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unterminated {0} quote")]
    Quote(char),
    #[error("`${{` without its closing `}}`")]
    Brace,
    #[error("`{0}` is not a variable name")]
    BadName(String),
    #[error("{0}")]
    Required(String),
}

/// Expands variables in one raw word and removes its quotes: nothing is expanded inside single
/// quotes; `escape` makes the next character literal.
pub fn expand(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), _) => out.push(c),
            (None, '\'') | (None, '"') => quote = Some(c),
            (_, e) if e == escape => {
                i += 1;
                if let Some(&next) = chars.get(i) {
                    // Inside double quotes, only a few characters are escapable.
                    if quote == Some('"') && !matches!(next, '"' | '$' | '`') && next != escape {
                        out.push(e);
                    }
                    out.push(next);
                }
            }
            (_, '$') => {
                let (value, used) = variable(&chars[i + 1..], escape, lookup)?;
                match used {
                    0 => out.push('$'),
                    n => {
                        out.push_str(&value);
                        i += n;
                    }
                }
            }
            _ => out.push(c),
        }
        i += 1;
    }
    match quote {
        Some(q) => Err(ExpandError::Quote(q)),
        None => Ok(out),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The value of the variable reference after a `$`, and how many characters it took (0: the
/// `$` stands for itself).
fn variable(
    rest: &[char],
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, usize), ExpandError> {
    match rest.first() {
        Some('{') => {
            let close = rest
                .iter()
                .position(|&c| c == '}')
                .ok_or(ExpandError::Brace)?;
            let inner: String = rest[1..close].iter().collect();
            let name_len = inner.chars().take_while(|&c| is_name_char(c)).count();
            let (name, op) = inner.split_at(name_len);
            if name.is_empty() {
                return Err(ExpandError::BadName(inner));
            }
            let value = lookup(name);
            let set = value.as_deref().is_some_and(|v| !v.is_empty());
            let expanded = match op {
                "" => value.unwrap_or_default(),
                _ if op.starts_with(":-") => {
                    if set {
                        value.unwrap_or_default()
                    } else {
                        expand(&op[2..], escape, lookup)?
                    }
                }
                _ if op.starts_with(":+") => {
                    if set {
                        expand(&op[2..], escape, lookup)?
                    } else {
                        String::new()
                    }
                }
                _ if op.starts_with(":?") => {
                    if set {
                        value.unwrap_or_default()
                    } else {
                        return Err(ExpandError::Required(format!(
                            "{name}: {}",
                            if op.len() > 2 { &op[2..] } else { "is not set" }
                        )));
                    }
                }
                _ => return Err(ExpandError::BadName(inner)),
            };
            Ok((expanded, close + 1))
        }
        Some(&c) if is_name_char(c) && !c.is_ascii_digit() => {
            let len = rest.iter().take_while(|&&c| is_name_char(c)).count();
            let name: String = rest[..len].iter().collect();
            Ok((lookup(&name).unwrap_or_default(), len))
        }
        _ => Ok((String::new(), 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/root".into()),
            "EMPTY" => Some(String::new()),
            "V" => Some("1.2".into()),
            _ => None,
        }
    }

    fn ex(word: &str) -> Result<String, ExpandError> {
        expand(word, '\\', &vars)
    }

    #[test]
    fn words_keep_their_quotes_until_expansion() {
        assert_eq!(
            split_words(r#"a "b c" 'd e' f\ g"#, '\\').unwrap(),
            [r#"a"#, r#""b c""#, "'d e'", r"f\ g"]
        );
        assert!(split_words(r#"a "b"#, '\\').is_err());
        assert_eq!(split_words("  ", '\\').unwrap(), Vec::<String>::new());
    }

    #[test]
    fn expansion_follows_the_shell() {
        assert_eq!(ex("$HOME/bin").unwrap(), "/root/bin");
        assert_eq!(ex("${HOME}x").unwrap(), "/rootx");
        assert_eq!(ex("'$HOME'").unwrap(), "$HOME");
        assert_eq!(ex(r#""$HOME x""#).unwrap(), "/root x");
        assert_eq!(ex(r"\$HOME").unwrap(), "$HOME");
        assert_eq!(ex("${NOPE:-dflt}").unwrap(), "dflt");
        assert_eq!(ex("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(ex("${V:-dflt}").unwrap(), "1.2");
        assert_eq!(ex("${V:+set}").unwrap(), "set");
        assert_eq!(ex("${NOPE:+set}").unwrap(), "");
        assert_eq!(ex("a$").unwrap(), "a$");
        assert_eq!(ex("$1").unwrap(), "$1");
        assert!(matches!(
            ex("${NOPE:?must be set}"),
            Err(ExpandError::Required(_))
        ));
        assert!(matches!(ex("${HOME"), Err(ExpandError::Brace)));
        assert!(matches!(ex("'open"), Err(ExpandError::Quote('\''))));
        assert_eq!(expand("`$HOME", '`', &vars).unwrap(), "$HOME");
    }
}
