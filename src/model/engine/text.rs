//! Generated tokens to streamed text: complete UTF-8 only, stop strings cut and never
//! streamed (a tail that could begin one is held back until it cannot). Pure.

/// The text of one sequence's generated tokens as it grows.
pub struct TextStream {
    generated: Vec<u32>,
    text: String,
    emitted: usize,
    stop: Vec<String>,
}

/// What one more token did to the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// New text safe to send.
    pub piece: String,
    /// A stop string appeared: the text ends before it.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stop: &[String]) -> TextStream {
        TextStream {
            generated: Vec::new(),
            text: String::new(),
            emitted: 0,
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Adds a token; `decode` turns the generated ids into text.
    pub fn push(&mut self, token: u32, decode: &dyn Fn(&[u32]) -> Result<String, String>) -> Result<Step, String> {
        self.generated.push(token);
        self.text = decode(&self.generated)?;
        if let Some(cut) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            let piece = self.text.get(self.emitted..).unwrap_or_default().to_string();
            self.emitted = self.text.len();
            return Ok(Step { piece, stopped: true });
        }
        // A multi-byte character split across tokens decodes to U+FFFD until complete.
        let safe = self.text.len() - held_back(&self.text, &self.stop);
        if self.text.ends_with('\u{FFFD}') || safe <= self.emitted || !self.text.is_char_boundary(safe) {
            return Ok(Step { piece: String::new(), stopped: false });
        }
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok(Step { piece, stopped: false })
    }

    /// Whatever was held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        let rest = self.text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = self.text.len();
        rest
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn tokens(&self) -> usize {
        self.generated.len()
    }
}

/// Length of the longest tail of `text` that is a proper prefix of a stop string.
fn held_back(text: &str, stop: &[String]) -> usize {
    stop.iter()
        .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str, stop: &[&str]) -> (String, Vec<String>) {
        let bytes: Vec<u8> = script.bytes().collect();
        let decode =
            |ids: &[u32]| Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned());
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut stream = TextStream::new(&stop);
        let mut pieces = Vec::new();
        for b in bytes {
            let step = stream.push(u32::from(b), &decode).unwrap();
            pieces.push(step.piece);
            if step.stopped {
                return (stream.text().to_string(), pieces);
            }
        }
        pieces.push(stream.finish());
        (stream.text().to_string(), pieces)
    }

    #[test]
    fn multi_character_stop_strings_are_never_streamed() {
        let (text, pieces) = run("ab}}cd", &["}}"]);
        assert_eq!(text, "ab");
        assert_eq!(pieces.concat(), "ab");
        let (text, pieces) = run("a}b", &["}}"]);
        assert_eq!(text, "a}b");
        assert_eq!(pieces.concat(), "a}b");
    }

    #[test]
    fn split_characters_wait_until_complete() {
        let (text, pieces) = run("é!", &[]);
        assert_eq!(text, "é!");
        assert_eq!(pieces[0], "", "half of é is held");
        assert_eq!(pieces.concat(), "é!");
    }
}
