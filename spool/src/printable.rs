//! Text from agents made safe to show on a terminal.
//!
//! Agent ids, phases, messages, servers, tokens and job logs are written by
//! agents, and whoever holds the agent key can write anything there. A
//! terminal obeys what it prints: ESC starts sequences that set the window
//! title, clear the screen or write the clipboard (OSC 52); the C1 controls
//! (U+0080 to U+009F, CSI is U+009B) do the same in one character; CR and
//! backspace overwrite what is already shown; bidi overrides reorder the rest
//! of a line. Everything the master shows from an agent goes through
//! [`printable`] (one-line fields) or [`printable_log_line`] (log lines).
//!
//! Escapes, so that the operator sees what is there and the terminal sees
//! plain text:
//!
//! | character                                   | shown as          |
//! |---------------------------------------------|-------------------|
//! | tab, newline, carriage return               | `\t`, `\n`, `\r`  |
//! | other C0 controls and DEL (ESC, BEL, BS, …) | `\x1b`, `\x07`, … |
//! | C1 controls U+0080 to U+009F                | `\u{9b}`, …       |
//! | bidi controls and line separators           | `\u{202e}`, …     |
//!
//! The bidi controls are the embeddings and overrides U+202A to U+202E, the
//! isolates U+2066 to U+2069 and the marks U+200E, U+200F and U+061C; the
//! separators are U+2028 and U+2029. A backslash is left as it is: the
//! escapes are for reading, not for parsing back.

use std::borrow::Cow;
use std::fmt::Write;

/// Columns between tab stops in a log line.
const TAB_STOP: usize = 8;

/// `s` with every control character, bidi control and line separator
/// escaped (see the module's table); borrowed when there is none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// One line of a job log as the operator should read it: terminal escape
/// sequences (colours, cursor moves, titles, OSC strings) removed, tabs
/// expanded to spaces, a trailing CR dropped, and whatever control is left
/// escaped as [`printable`] does. The text itself is kept.
pub fn printable_log_line(line: &str) -> Cow<'_, str> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if !line.chars().any(needs_escape) {
        return Cow::Borrowed(line);
    }
    let chars: Vec<char> = line.chars().collect();
    let mut text = String::with_capacity(line.len());
    let mut column = 0;
    let mut i = 0;
    while i < chars.len() {
        if let Some(len) = sequence_len(&chars[i..]) {
            i += len;
            continue;
        }
        let c = chars[i];
        if c == '\t' {
            let pad = TAB_STOP - column % TAB_STOP;
            text.extend(std::iter::repeat_n(' ', pad));
            column += pad;
        } else {
            let before = text.len();
            push_escaped(&mut text, c);
            column += text[before..].chars().count();
        }
        i += 1;
    }
    Cow::Owned(text)
}

/// Whether [`printable`] escapes `c`: for encoders of other formats (JSON)
/// that must keep the same characters away from a terminal.
pub fn needs_escape(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
    )
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 && needs_escape(c) => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// ESC or a C1 introducer.
const ESC: char = '\u{1b}';
const BEL: char = '\u{07}';
/// String terminator as one C1 character.
const ST: char = '\u{9c}';

/// The length in characters of the complete escape sequence at the start of
/// `s`, if there is one: CSI (`ESC [` or U+009B, parameters, intermediates,
/// a final byte), a control string (OSC, DCS, SOS, PM, APC, ended by BEL or
/// ST) or a short `ESC` sequence (intermediates and a final byte). A
/// sequence cut short is not one: its characters are escaped instead.
fn sequence_len(s: &[char]) -> Option<usize> {
    let (kind, body) = match s {
        [ESC, '[', ..] => (Kind::Csi, 2),
        [ESC, ']' | 'P' | 'X' | '^' | '_', ..] => (Kind::String, 2),
        [ESC, ..] => (Kind::Short, 1),
        ['\u{9b}', ..] => (Kind::Csi, 1),
        ['\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}', ..] => (Kind::String, 1),
        _ => return None,
    };
    let rest = &s[body..];
    match kind {
        Kind::Csi => {
            let params = rest
                .iter()
                .take_while(|c| ('\u{20}'..='\u{3f}').contains(*c))
                .count();
            match rest.get(params) {
                Some(c) if ('\u{40}'..='\u{7e}').contains(c) => Some(body + params + 1),
                _ => None,
            }
        }
        Kind::String => {
            let mut i = 0;
            while i < rest.len() {
                match rest[i] {
                    BEL | ST => return Some(body + i + 1),
                    ESC if rest.get(i + 1) == Some(&'\\') => return Some(body + i + 2),
                    _ => i += 1,
                }
            }
            None
        }
        Kind::Short => {
            let inter = rest
                .iter()
                .take_while(|c| ('\u{20}'..='\u{2f}').contains(*c))
                .count();
            match rest.get(inter) {
                Some(c) if ('\u{30}'..='\u{7e}').contains(c) => Some(body + inter + 1),
                _ => None,
            }
        }
    }
}

enum Kind {
    Csi,
    String,
    Short,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a terminal could take anything in `s` as a command.
    fn inert(s: &str) -> bool {
        !s.chars().any(needs_escape)
    }

    #[test]
    fn plain_text_is_borrowed() {
        for s in ["agent-a", "payloads 40%", "10.0.0.1:22", "Grüße ✓ 日本", ""] {
            assert!(matches!(printable(s), Cow::Borrowed(_)), "{s:?}");
            assert!(matches!(printable_log_line(s), Cow::Borrowed(_)), "{s:?}");
        }
    }

    #[test]
    fn escapes_c0_c1_and_bidi_controls() {
        let cases = [
            ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
            ("\x1b[2J", "\\x1b[2J"),
            ("\x1b]52;c;aGVsbG8=\x07", "\\x1b]52;c;aGVsbG8=\\x07"),
            ("ok\rfailed", "ok\\rfailed"),
            ("a\x08b", "a\\x08b"),
            ("two\nlines\tand a tab", "two\\nlines\\tand a tab"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("\u{85}", "\\u{85}"),
            ("nul\0 del\x7f", "nul\\x00 del\\x7f"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("\u{2066}x\u{2069}", "\\u{2066}x\\u{2069}"),
            ("\u{200f}\u{61c}\u{2028}", "\\u{200f}\\u{61c}\\u{2028}"),
        ];
        for (raw, shown) in cases {
            assert_eq!(printable(raw), shown, "{raw:?}");
            assert!(inert(&printable(raw)));
        }
    }

    #[test]
    fn log_lines_lose_their_escape_sequences_and_keep_their_text() {
        let cases = [
            ("\x1b[1;31merror\x1b[0m: disk", "error: disk"),
            ("\x1b]0;pwned\x07title gone", "title gone"),
            ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),
            ("\u{9b}2Jcleared", "cleared"),
            ("\u{9d}52;c;aGk=\u{9c}clipboard", "clipboard"),
            ("\x1b(Bcharset", "charset"),
            ("crlf\r", "crlf"),
            ("a\tb", "a       b"),
            ("abcdefgh\tx", "abcdefgh        x"),
            ("10%\r20%", "10%\\r20%"),
            ("bell\x07", "bell\\x07"),
            ("cut \x1b]0;no end", "cut \\x1b]0;no end"),
            ("cut \x1b[12", "cut \\x1b[12"),
            ("rtl \u{202e}txt", "rtl \\u{202e}txt"),
        ];
        for (raw, shown) in cases {
            assert_eq!(printable_log_line(raw), shown, "{raw:?}");
            assert!(inert(&printable_log_line(raw)));
        }
    }

    #[test]
    fn nothing_escapes_whatever_the_input() {
        // Every character below U+0100 and the bidi range, in pairs, so that
        // each possible introducer meets each possible follower.
        let chars: Vec<char> = (0u32..0x100)
            .chain(0x2000..0x2070)
            .filter_map(char::from_u32)
            .collect();
        for &a in &chars {
            let mut s = String::new();
            for &b in &chars {
                s.push(a);
                s.push(b);
            }
            assert!(inert(&printable(&s)), "{a:?}");
            assert!(inert(&printable_log_line(&s)), "{a:?}");
        }
    }
}
