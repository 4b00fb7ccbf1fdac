//! Just enough of PostgreSQL's lexical rules to find words outside strings and comments.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tok {
    /// An unquoted word (keyword or identifier): its byte range.
    Word(usize, usize),
    /// A double-quoted identifier.
    Quoted,
    /// A string or numeric literal, or a parameter ($1).
    Literal,
    Punct(u8),
}

pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a [u8]) -> Self {
        Lexer { src, pos: 0 }
    }

    pub fn src(&self) -> &'a [u8] {
        self.src
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    fn peek(&self, off: usize) -> u8 {
        *self.src.get(self.pos + off).unwrap_or(&0)
    }

    fn skip_space_and_comments(&mut self) {
        loop {
            let c = self.peek(0);
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if c == b'-' && self.peek(1) == b'-' {
                while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if c == b'/' && self.peek(1) == b'*' {
                // Block comments nest in PostgreSQL.
                let mut depth = 0;
                while self.pos < self.src.len() {
                    if self.peek(0) == b'/' && self.peek(1) == b'*' {
                        depth += 1;
                        self.pos += 2;
                    } else if self.peek(0) == b'*' && self.peek(1) == b'/' {
                        depth -= 1;
                        self.pos += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        self.pos += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    fn skip_quoted(&mut self, q: u8, backslash: bool) {
        self.pos += 1;
        while self.pos < self.src.len() {
            let c = self.src[self.pos];
            if backslash && c == b'\\' {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if c == q {
                if self.peek(0) == q {
                    self.pos += 1;
                    continue;
                }
                return;
            }
        }
    }

    /// At a '$': a dollar-quoted string ($$...$$ or $tag$...$tag$), or a parameter.
    fn dollar(&mut self) -> Tok {
        let start = self.pos;
        let mut end = self.pos + 1;
        while end < self.src.len() && (self.src[end].is_ascii_alphanumeric() || self.src[end] == b'_') {
            end += 1;
        }
        if end < self.src.len() && self.src[end] == b'$' && !self.src[start + 1..end].first().is_some_and(u8::is_ascii_digit) {
            let tag = &self.src[start..=end];
            let body = end + 1;
            match self.src[body..].windows(tag.len()).position(|w| w == tag) {
                Some(i) => self.pos = body + i + tag.len(),
                None => self.pos = self.src.len(),
            }
        } else {
            self.pos = end;
        }
        Tok::Literal
    }

    /// The next token with its byte range.
    pub fn next_with_span(&mut self) -> Option<(Tok, usize, usize)> {
        self.skip_space_and_comments();
        let start = self.pos;
        let tok = self.next()?;
        Some((tok, start, self.pos))
    }

    pub fn next(&mut self) -> Option<Tok> {
        self.skip_space_and_comments();
        let c = *self.src.get(self.pos)?;
        let tok = match c {
            b'\'' => {
                let backslash = self.pos > 0 && matches!(self.src[self.pos - 1], b'e' | b'E');
                self.skip_quoted(b'\'', backslash);
                Tok::Literal
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                Tok::Quoted
            }
            b'$' => self.dollar(),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = self.pos;
                while self.pos < self.src.len() {
                    let c = self.src[self.pos];
                    if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                // E'..', B'..', X'..', U&'..' prefixes: the quote that follows is a literal.
                if self.peek(0) == b'\'' && self.pos - start <= 2 {
                    let backslash = self.src[start].eq_ignore_ascii_case(&b'e');
                    self.skip_quoted(b'\'', backslash);
                    return Some(Tok::Literal);
                }
                Tok::Word(start, self.pos)
            }
            c if c.is_ascii_digit() => {
                while self.pos < self.src.len() && (self.src[self.pos].is_ascii_alphanumeric() || self.src[self.pos] == b'.') {
                    self.pos += 1;
                }
                Tok::Literal
            }
            c => {
                self.pos += 1;
                Tok::Punct(c)
            }
        };
        Some(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        let mut lx = Lexer::new(s.as_bytes());
        let mut out = vec![];
        while let Some(t) = lx.next() {
            if let Tok::Word(a, b) = t {
                out.push(s[a..b].to_string());
            }
        }
        out
    }

    #[test]
    fn skips_strings_and_comments() {
        assert_eq!(words("select 'a''b update' -- delete\n from /* x /* y */ insert */ t"), ["select", "from", "t"]);
        assert_eq!(words("select E'it\\'s update', $q$ delete $q$, $1 from t"), ["select", "from", "t"]);
        assert_eq!(words("select \"update\" from t"), ["select", "from", "t"]);
        assert_eq!(words("select 'unterminated"), ["select"]);
        assert_eq!(words("select $tag$ never closed"), ["select"]);
    }
}
