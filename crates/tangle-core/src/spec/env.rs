//! `${VAR}` interpolation of spec strings.
//!
//! Secrets come from the environment and never from the spec file. Errors name the
//! variable, never its value, so a message can never leak a secret.

/// What one reference in a string went wrong with. `offset` is in characters from the start
/// of the string, for pointing a caret at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvError {
    Undefined { name: String, offset: usize, len: usize },
    Malformed { offset: usize, len: usize },
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment values; `$$` is a literal `$`.
/// A `$` not followed by `{` or `$` is kept as it is.
pub fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, Vec<EnvError>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match (chars[i], chars.get(i + 1)) {
            ('$', Some('$')) => {
                out.push('$');
                i += 2;
            }
            ('$', Some('{')) => {
                let Some(close) = chars[i + 2..].iter().position(|&c| c == '}').map(|p| p + i + 2) else {
                    errors.push(EnvError::Malformed { offset: i, len: chars.len() - i });
                    break;
                };
                let inner: String = chars[i + 2..close].iter().collect();
                let (name, default) = match inner.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (inner.as_str(), None),
                };
                let len = close + 1 - i;
                if !is_var_name(name) {
                    errors.push(EnvError::Malformed { offset: i, len });
                } else {
                    match lookup(name).filter(|v| !v.is_empty()).or(default.map(str::to_string)) {
                        Some(value) => out.push_str(&value),
                        None => errors.push(EnvError::Undefined { name: name.to_string(), offset: i, len }),
                    }
                }
                i = close + 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Whether a string takes any of its value from the environment.
pub fn references_env(text: &str) -> bool {
    text.contains("${")
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-secret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_references_and_defaults() {
        assert_eq!(interpolate("a ${KEY} b", &env).as_deref(), Ok("a sk-secret b"));
        assert_eq!(interpolate("${NOPE:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(interpolate("${EMPTY:-fallback}", &env).as_deref(), Ok("fallback"));
        assert_eq!(interpolate("cost $5, $$HOME", &env).as_deref(), Ok("cost $5, $HOME"));
    }

    #[test]
    fn undefined_names_the_variable_and_its_position() {
        let err = interpolate("ab${MISSING}", &env).expect_err("undefined");
        assert_eq!(err, vec![EnvError::Undefined { name: "MISSING".into(), offset: 2, len: 10 }]);
    }

    #[test]
    fn malformed_references_are_errors() {
        assert!(matches!(interpolate("${", &env).as_deref().map_err(Vec::as_slice), Err([EnvError::Malformed { .. }])));
        assert!(matches!(
            interpolate("${1X}", &env).as_deref().map_err(Vec::as_slice),
            Err([EnvError::Malformed { .. }])
        ));
    }
}
