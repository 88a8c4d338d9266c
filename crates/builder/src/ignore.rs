//! `.dockerignore`: which files of a build context a build never sees.
//!
//! As Docker reads it: one pattern per line (`#` comments and blank lines skipped, surrounding
//! spaces trimmed, a leading `/` meaning the context's root, the pattern cleaned of `.` parts);
//! `*`, `?` and `[...]` do not cross `/`, `**` matches any number of folders; `!` makes an
//! exception. A path is left out when the last pattern that matches it, or one of its parent
//! folders, is not an exception.

use globset::{Glob, GlobMatcher};

#[derive(Debug, Clone, Default)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    matcher: GlobMatcher,
    exception: bool,
}

impl Ignore {
    /// Reads a `.dockerignore`; an error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Ignore, String> {
        let mut patterns = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            patterns
                .extend(Pattern::new(line).map_err(|e| format!(".dockerignore:{}: {e}", n + 1))?);
        }
        Ok(Ignore { patterns })
    }

    /// Patterns given one by one (`COPY --exclude`), in the same language; an error names the
    /// flag and the pattern.
    pub fn patterns(list: &[String], flag: &str) -> Result<Ignore, String> {
        let mut patterns = Vec::new();
        for p in list {
            patterns.extend(Pattern::new(p.trim()).map_err(|e| format!("{flag}: {e}"))?);
        }
        Ok(Ignore { patterns })
    }

    /// Whether `path` (relative to the context, `/`-separated) is left out of the build.
    pub fn excludes(&self, path: &str) -> bool {
        let path = clean(path);
        let mut excluded = false;
        for p in &self.patterns {
            // An exception only matters for what is excluded so far, and the reverse.
            if p.exception != excluded {
                continue;
            }
            if p.matcher.is_match(&path) || parents(&path).any(|parent| p.matcher.is_match(parent))
            {
                excluded = !p.exception;
            }
        }
        excluded
    }
}

impl Pattern {
    /// One line's pattern (`!` for an exception); none for one that names nothing.
    fn new(line: &str) -> Result<Option<Pattern>, String> {
        let (exception, body) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        let cleaned = clean(body);
        if cleaned.is_empty() {
            return Ok(None);
        }
        let matcher = globset::GlobBuilder::new(&cleaned)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map(|g: Glob| g.compile_matcher())
            .map_err(|e| format!("`{body}`: {e}"))?;
        Ok(Some(Pattern { matcher, exception }))
    }
}

/// `path`'s parent folders, nearest last: `a/b/c` → `a`, `a/b`.
fn parents(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Without a leading `/`, `.` parts, or repeated and trailing slashes.
fn clean(path: &str) -> String {
    path.split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> Ignore {
        Ignore::parse(text).unwrap()
    }

    #[test]
    fn patterns_exclude_files_and_everything_under_folders() {
        let i = ignore("# build output\nnode_modules\n/target\n*.log\n\n  docs/**/*.md  \n");
        assert!(i.excludes("node_modules"));
        assert!(i.excludes("node_modules/left-pad/index.js"));
        assert!(i.excludes("target/debug/app"));
        assert!(i.excludes("./target"));
        assert!(i.excludes("error.log"));
        assert!(!i.excludes("logs/error.log"), "* does not cross /");
        assert!(i.excludes("docs/a.md") && i.excludes("docs/x/y/b.md"));
        assert!(!i.excludes("docs/a.txt"));
        assert!(!i.excludes("src/main.rs"));
        assert!(!i.excludes("app/node_modules_list.txt"));
    }

    #[test]
    fn the_last_matching_pattern_decides() {
        let i = ignore("*.log\n!keep.log\nkeep.log.d\n**/tmp*\n!src/tmpl.rs\n");
        assert!(i.excludes("debug.log"));
        assert!(!i.excludes("keep.log"));
        assert!(i.excludes("a/b/tmpfile"));
        assert!(i.excludes("tmp"));
        assert!(!i.excludes("src/tmpl.rs"));
        // An exception before the pattern it would undo has no effect.
        let i = ignore("!a.txt\n*.txt\n");
        assert!(i.excludes("a.txt"));
    }

    #[test]
    fn a_bad_pattern_is_refused_with_its_line() {
        let err = Ignore::parse("ok\n[z-a\n").unwrap_err();
        assert!(err.starts_with(".dockerignore:2:"), "{err}");
    }
}
