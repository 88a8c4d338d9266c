//! Positions in an environment file and the diagnostics (errors and warnings) that point at them.
//!
//! Every problem Warren reports about an environment file names the file, the line and the column,
//! and says what was expected. This module owns that shape and its rendering; the readers decide
//! what the messages say.

use std::fmt;

use serde::Serialize;

/// A place in a source file: 1-based line and 1-based column (counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };

    pub(crate) fn new(line: usize, column: usize) -> Pos {
        Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file cannot be used as it is.
    Error,
    /// The file is usable, but something in it is ignored or changed.
    Warning,
}

/// One problem found in an environment file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file, relative to the repository root, with `/` separators.
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl Diagnostic {
    pub fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.column,
        }
    }

    /// The diagnostic followed by the offending source line and a caret under the column, in the
    /// style of compiler messages. `source` is the whole text of [`Diagnostic::file`].
    pub fn render(&self, source: &str) -> String {
        let mut out = format!("{self}\n");
        let line_no = self.line as usize;
        if let Some(text) = source.lines().nth(line_no.saturating_sub(1)) {
            let gutter = line_no.to_string().len();
            let text = text.replace('\t', " ");
            let caret_at = text
                .chars()
                .take(self.column.saturating_sub(1) as usize)
                .count();
            out.push_str(&format!("{:gutter$} |\n", ""));
            out.push_str(&format!("{line_no} | {text}\n"));
            out.push_str(&format!("{:gutter$} | {:caret_at$}^\n", "", ""));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {label}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// The diagnostics collected while reading one file.
#[derive(Debug)]
pub(crate) struct Diagnostics {
    file: String,
    pub(crate) errors: Vec<Diagnostic>,
    pub(crate) warnings: Vec<Diagnostic>,
}

impl Diagnostics {
    pub(crate) fn new(file: &str) -> Diagnostics {
        Diagnostics {
            file: file.to_owned(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn make(&self, severity: Severity, pos: Pos, message: String) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message,
        }
    }

    pub(crate) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        let d = self.make(Severity::Error, pos, message.into());
        self.errors.push(d);
    }

    pub(crate) fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        let d = self.make(Severity::Warning, pos, message.into());
        self.warnings.push(d);
    }

    #[cfg(test)]
    pub(crate) fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Errors and warnings, each in source order.
    pub(crate) fn into_parts(mut self) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
        self.errors.sort_by_key(Diagnostic::pos);
        self.warnings.sort_by_key(Diagnostic::pos);
        (self.errors, self.warnings)
    }
}

/// Maps byte offsets of a text to [`Pos`].
#[derive(Debug)]
pub(crate) struct LineIndex<'t> {
    text: &'t str,
    line_starts: Vec<usize>,
}

impl<'t> LineIndex<'t> {
    pub(crate) fn new(text: &'t str) -> LineIndex<'t> {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, line_starts }
    }

    pub(crate) fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        Pos::new(line + 1, column + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_counts_characters_not_bytes() {
        let idx = LineIndex::new("ab\nxé z\n");
        assert_eq!(idx.pos(0), Pos::new(1, 1));
        assert_eq!(idx.pos(3), Pos::new(2, 1));
        // 'é' is two bytes: offset 6 is the space after it, the third character.
        assert_eq!(idx.pos(6), Pos::new(2, 3));
        assert_eq!(idx.pos(100), Pos::new(3, 1));
    }

    #[test]
    fn render_points_at_the_column() {
        let d = Diagnostic {
            severity: Severity::Error,
            file: "warren.yml".into(),
            line: 2,
            column: 8,
            message: "expected a string".into(),
        };
        let out = d.render("a: 1\nimage: [x]\n");
        assert_eq!(
            out,
            "warren.yml:2:8: error: expected a string\n  |\n2 | image: [x]\n  |        ^\n"
        );
    }
}
