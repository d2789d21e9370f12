//! The byte-level codecs: uppercasing a byte stream (the echo service) and splitting a byte
//! stream into bounded lines (the bank service). No I/O here: bytes in, bytes or frames out.
//!
//! Uppercasing follows Python's `str.upper()` on valid UTF-8 (`straße` → `STRASSE`,
//! `ǆ` → `Ǆ`, scripts without case unchanged). Bytes that are not part of a valid UTF-8
//! sequence are copied unchanged (ASCII is always valid, so ASCII letters are uppercased
//! whatever surrounds them). Uppercasing is context-free, so a stream can be uppercased in
//! pieces: [`Uppercaser`] only holds back the 1 to 3 bytes of a UTF-8 sequence that a read
//! boundary cut in half, and its output never depends on where the reads were split.

mod non_ascii;

use non_ascii::{copy_uppercasing_non_ascii, MAX_GROWTH, STORE_SLACK};

/// Appends the uppercase of `bytes` to `out`.
///
/// Valid UTF-8 sequences are uppercased the Unicode way; every byte that is not part of a
/// valid sequence is copied unchanged. The output may be longer than the input (`ß` → `SS`),
/// at most three times as long.
pub fn uppercase_line(bytes: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    if bytes.is_ascii() {
        out.extend_from_slice(bytes);
    } else {
        // Room for the longest possible result, plus the slack of the fixed-size stores.
        out.resize(start + bytes.len() * MAX_GROWTH + STORE_SLACK, 0);
        let written = copy_uppercasing_non_ascii(bytes, &mut out[start..]);
        out.truncate(start + written);
    }
    // ASCII letters in one (vectorised) pass. It touches nothing else: every byte of a
    // multi-byte sequence, and every invalid byte, is 0x80 or above.
    out[start..].make_ascii_uppercase();
}

/// Builds the uppercase tables now rather than on the first non-ASCII line. A server calls
/// it before forking, so that its workers share one copy and none pays for building it.
pub fn prepare_uppercase_tables() {
    non_ascii::prepare_tables();
}

/// Uppercases a byte stream that arrives in arbitrary pieces.
///
/// Feeding a stream in any split gives exactly the output of [`uppercase_line`] on the whole
/// stream: the only state is the unfinished tail of a UTF-8 sequence (at most 3 bytes), so
/// memory stays constant however long a line is.
#[derive(Debug, Default, Clone)]
pub struct Uppercaser {
    /// The start of a multi-byte sequence cut by the end of the previous piece.
    held: [u8; 3],
    held_len: u8,
}

impl Uppercaser {
    /// Appends the uppercase of everything in `input` that can be decided now to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.held_len == 0 {
            let cut = complete_prefix_len(input);
            uppercase_line(&input[..cut], out);
            self.hold(&input[cut..]);
            return;
        }
        // Join the held bytes with just enough input to finish (or refute) that sequence.
        let held = usize::from(self.held_len);
        let take = input.len().min(4 - held);
        let mut buf = [0u8; 4];
        buf[..held].copy_from_slice(&self.held[..held]);
        buf[held..held + take].copy_from_slice(&input[..take]);
        let joined = &buf[..held + take];
        if is_unfinished_sequence(joined) {
            self.hold(joined);
            return;
        }
        self.held_len = 0;
        let needed = utf8_sequence_len(joined[0]);
        if joined.len() >= needed && std::str::from_utf8(&joined[..needed]).is_ok() {
            uppercase_line(&joined[..needed], out);
            self.feed(&input[needed - held..], out);
        } else {
            // A lead byte and continuation bytes that the input did not complete: none of
            // them belongs to a valid sequence, so they go back unchanged.
            out.extend_from_slice(&self.held[..held]);
            self.feed(input, out);
        }
    }

    /// Flushes the held bytes at the end of the stream (an unfinished sequence is invalid
    /// UTF-8, so it goes back unchanged).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held[..usize::from(self.held_len)]);
        self.held_len = 0;
    }

    /// The bytes held back: the start of a UTF-8 sequence cut by the end of the last piece
    /// (at most 3). With [`Uppercaser::resume`], another process continues the stream.
    pub fn held(&self) -> &[u8] {
        &self.held[..usize::from(self.held_len)]
    }

    /// An uppercaser that continues a stream whose [`Uppercaser::held`] bytes were `held`;
    /// `None` if they are not the unfinished start of a UTF-8 sequence (as `held` never is).
    pub fn resume(held: &[u8]) -> Option<Uppercaser> {
        if !held.is_empty() && !is_unfinished_sequence(held) {
            return None;
        }
        let mut upper = Uppercaser::default();
        upper.hold(held);
        Some(upper)
    }

    fn hold(&mut self, tail: &[u8]) {
        self.held[..tail.len()].copy_from_slice(tail);
        self.held_len = tail.len() as u8;
    }
}

/// The length of the prefix of `bytes` that does not end inside an unfinished (but so far
/// valid) UTF-8 sequence: holding back the rest cannot change the output.
fn complete_prefix_len(bytes: &[u8]) -> usize {
    let from = bytes.len().saturating_sub(3);
    for start in (from..bytes.len()).rev() {
        if bytes[start] < 0x80 {
            break;
        }
        if utf8_sequence_len(bytes[start]) > 1 {
            if is_unfinished_sequence(&bytes[start..]) {
                return start;
            }
            break;
        }
    }
    bytes.len()
}

/// True if `bytes` is the start of a valid multi-byte sequence that needs more bytes.
fn is_unfinished_sequence(bytes: &[u8]) -> bool {
    matches!(std::str::from_utf8(bytes), Err(e) if e.valid_up_to() == 0 && e.error_len().is_none())
}

/// The length of the sequence a byte starts: 1 for ASCII, 2 to 4 for a lead byte, 0 for a
/// continuation byte or a byte that never starts a sequence.
fn utf8_sequence_len(byte: u8) -> usize {
    match byte {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    }
}

/// One item cut from a byte stream by [`LineFramer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its `\n` (a `\r` before it is left in place).
    Line(&'a [u8]),
    /// The current line grew past the limit before its `\n` arrived. The framer has
    /// discarded it; the caller decides what to reply and whether to go on.
    TooLong,
}

/// What the frame handler wants the framer to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop delivering frames: the rest of the input is dropped (the caller is closing).
    Stop,
    /// Stop delivering frames for now: the handler took this frame but cannot answer it yet
    /// (it waits for something outside the connection). The rest of the input is the
    /// caller's to keep and to feed again, in order, once the wait is over.
    Wait,
}

/// Splits a byte stream into `\n`-terminated lines of at most `max_line` bytes.
///
/// Complete lines are handed out straight from the input when possible; only the unfinished
/// last line of a piece is copied, and never more than `max_line` bytes of it.
#[derive(Debug)]
pub struct LineFramer {
    max_line: usize,
    /// The start of a line whose `\n` has not arrived yet.
    partial: Vec<u8>,
    /// The current line already overflowed: drop bytes until its end.
    discarding: bool,
}

impl LineFramer {
    /// A framer for lines of at most `max_line` bytes, not counting the `\n` (nor the `\r`
    /// of a `\r\n` ending: CRLF is the same request as LF).
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            max_line,
            partial: Vec::new(),
            discarding: false,
        }
    }

    /// Feeds the next piece of the stream, calling `on_frame` for every line it completes.
    /// Returns [`Flow::Stop`] if the handler stopped (the framer must not be fed again then)
    /// or [`Flow::Wait`] if it waits, and how many bytes of `input` were consumed: all of
    /// them, except after a wait, where the bytes past the waiting line are left to feed
    /// again later.
    pub fn feed(
        &mut self,
        whole_input: &[u8],
        mut on_frame: impl FnMut(Frame<'_>) -> Flow,
    ) -> (Flow, usize) {
        let mut input = whole_input;
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&input[..end], &input[end + 1..]);
            input = rest;
            let flow = if self.discarding {
                self.discarding = false;
                Flow::Continue
            } else if self.partial.len() + line.len()
                - usize::from(ends_with_cr(&self.partial, line))
                > self.max_line
            {
                self.partial.clear();
                on_frame(Frame::TooLong)
            } else if self.partial.is_empty() {
                on_frame(Frame::Line(line))
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                let flow = on_frame(Frame::Line(&whole));
                self.partial = whole;
                self.partial.clear();
                flow
            };
            if flow != Flow::Continue {
                return (flow, whole_input.len() - input.len());
            }
        }
        (self.keep_partial(input, on_frame), whole_input.len())
    }

    fn keep_partial(&mut self, tail: &[u8], mut on_frame: impl FnMut(Frame<'_>) -> Flow) -> Flow {
        if self.discarding || tail.is_empty() {
            return Flow::Continue;
        }
        // One byte more than the limit may still be the `\r` of a CRLF ending.
        let len = self.partial.len() + tail.len();
        if len > self.max_line + usize::from(ends_with_cr(&self.partial, tail)) {
            self.partial = Vec::new();
            self.discarding = true;
            return on_frame(Frame::TooLong);
        }
        self.partial.extend_from_slice(tail);
        Flow::Continue
    }

    /// The unterminated last line at the end of the stream, if any (it is answered too).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let last = std::mem::take(&mut self.partial);
        (!last.is_empty() && !self.discarding).then_some(last)
    }

    /// The longest line this framer accepts, in bytes.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Bytes held for an unfinished line (for memory accounting and idle-buffer release).
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// The unfinished line held so far, `None` while an overlong line is being discarded.
    /// With [`LineFramer::resume`], another process continues the stream.
    pub fn partial(&self) -> Option<&[u8]> {
        (!self.discarding).then_some(&self.partial)
    }

    /// A framer for lines of at most `max_line` bytes that continues a stream whose
    /// [`LineFramer::partial`] was `partial`. A `partial` already longer than `max_line` (a
    /// stream that moved to a process with a smaller limit) is refused when its line ends.
    pub fn resume(max_line: usize, partial: Vec<u8>) -> LineFramer {
        LineFramer {
            max_line,
            partial,
            discarding: false,
        }
    }
}

/// Does the line made of `partial` then `line` end in `\r` (a CRLF ending, which does not
/// count against the limit)?
fn ends_with_cr(partial: &[u8], line: &[u8]) -> bool {
    line.last().or(partial.last()) == Some(&b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_uppercaser_resumed_from_its_held_bytes_continues_the_stream() {
        let input = "aß€😀z".as_bytes();
        for cut in 0..=input.len() {
            let mut first = Uppercaser::default();
            let mut out = Vec::new();
            first.feed(&input[..cut], &mut out);
            let mut second = Uppercaser::resume(first.held()).expect("held bytes resume");
            second.feed(&input[cut..], &mut out);
            second.finish(&mut out);
            assert_eq!(out, "ASS€😀Z".as_bytes(), "cut at {cut}");
        }
        assert!(Uppercaser::resume(b"a").is_none(), "not a cut sequence");
        assert!(
            Uppercaser::resume(b"\xc3\xa9").is_none(),
            "a whole sequence"
        );
        assert!(Uppercaser::resume(b"\xff").is_none());
    }

    #[test]
    fn a_framer_resumed_from_its_partial_line_continues_the_stream() {
        let mut first = LineFramer::new(16);
        let mut lines = Vec::new();
        first.feed(b"one\ntw", |frame| {
            lines.push(format!("{frame:?}"));
            Flow::Continue
        });
        let partial = first.partial().expect("not discarding").to_vec();
        let mut second = LineFramer::resume(16, partial);
        second.feed(b"o\n", |frame| {
            lines.push(format!("{frame:?}"));
            Flow::Continue
        });
        assert_eq!(lines, ["Line([111, 110, 101])", "Line([116, 119, 111])"]);
        let mut smaller = LineFramer::resume(2, b"abc".to_vec());
        let mut frames = Vec::new();
        smaller.feed(b"d\n", |frame| {
            frames.push(frame == Frame::TooLong);
            Flow::Continue
        });
        assert_eq!(
            frames,
            [true],
            "an inherited line over the new limit is refused"
        );
    }

    fn upper(s: &str) -> String {
        let mut out = Vec::new();
        uppercase_line(s.as_bytes(), &mut out);
        String::from_utf8(out).expect("uppercase of valid UTF-8 is valid UTF-8")
    }

    #[test]
    fn uppercases_the_unicode_way() {
        assert_eq!(upper("hello, world\n"), "HELLO, WORLD\n");
        assert_eq!(upper("straße"), "STRASSE");
        assert_eq!(upper("ǆ"), "Ǆ");
        assert_eq!(upper("ﬃ"), "FFI");
        assert_eq!(upper("ΐ"), "\u{399}\u{308}\u{301}");
        assert_eq!(upper("你好，世界"), "你好，世界");
        assert_eq!(upper("crlf\r\n"), "CRLF\r\n");
    }

    #[test]
    fn invalid_utf8_bytes_go_back_unchanged_around_uppercased_text() {
        let mut out = Vec::new();
        uppercase_line(b"ab\xffcd\xc3(\xe9t\xc3\xa9", &mut out);
        assert_eq!(out, b"AB\xffCD\xc3(\xe9T\xc3\x89");
    }

    #[test]
    fn uppercaser_holds_a_sequence_cut_by_a_read() {
        let mut up = Uppercaser::default();
        let mut out = Vec::new();
        let text = "aß€😀".as_bytes();
        for byte in text {
            up.feed(std::slice::from_ref(byte), &mut out);
        }
        up.finish(&mut out);
        assert_eq!(out, "ASS€😀".as_bytes());
    }

    #[test]
    fn uppercaser_flushes_an_unfinished_sequence_at_the_end() {
        let mut up = Uppercaser::default();
        let mut out = Vec::new();
        up.feed(b"ok\xe2\x82", &mut out);
        assert_eq!(out, b"OK");
        up.finish(&mut out);
        assert_eq!(out, b"OK\xe2\x82");
    }

    fn frames(framer: &mut LineFramer, input: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut seen = Vec::new();
        framer.feed(input, |frame| {
            seen.push(match frame {
                Frame::Line(line) => Some(line.to_vec()),
                Frame::TooLong => None,
            });
            Flow::Continue
        });
        seen
    }

    #[test]
    fn framer_joins_lines_split_across_pieces() {
        let mut framer = LineFramer::new(16);
        assert_eq!(frames(&mut framer, b"one\ntw"), vec![Some(b"one".to_vec())]);
        assert_eq!(
            frames(&mut framer, b"o\r\nthr"),
            vec![Some(b"two\r".to_vec())]
        );
        assert_eq!(framer.finish(), Some(b"thr".to_vec()));
        assert_eq!(framer.finish(), None);
    }

    #[test]
    fn framer_reports_an_overlong_line_once_and_resumes_after_it() {
        let mut framer = LineFramer::new(4);
        assert_eq!(
            frames(&mut framer, b"abcd\nabc"),
            vec![Some(b"abcd".to_vec())]
        );
        assert_eq!(frames(&mut framer, b"de"), vec![None]);
        assert_eq!(framer.buffered(), 0);
        assert_eq!(
            frames(&mut framer, b"fgh\nok\n"),
            vec![Some(b"ok".to_vec())]
        );
        assert_eq!(frames(&mut framer, b"toolong\n"), vec![None]);
    }

    #[test]
    fn a_crlf_ending_does_not_count_against_the_limit() {
        let mut framer = LineFramer::new(4);
        assert_eq!(
            frames(&mut framer, b"abcd\r\n"),
            vec![Some(b"abcd\r".to_vec())]
        );
        assert_eq!(frames(&mut framer, b"abcd\r"), vec![]);
        assert_eq!(frames(&mut framer, b"\n"), vec![Some(b"abcd\r".to_vec())]);
        assert_eq!(frames(&mut framer, b"abcde\r\n"), vec![None]);
        assert_eq!(frames(&mut framer, b"abcd\rx\n"), vec![None]);
    }

    #[test]
    fn framer_stops_when_asked() {
        let mut framer = LineFramer::new(8);
        let mut seen = 0;
        let (flow, _) = framer.feed(b"a\nb\nc\n", |_| {
            seen += 1;
            Flow::Stop
        });
        assert_eq!((flow, seen), (Flow::Stop, 1));
    }

    /// A handler that waits after each line gets the lines one feed at a time, and the
    /// framer says where the unread rest starts, partial line included.
    #[test]
    fn framer_waits_and_the_rest_is_fed_again() {
        let mut framer = LineFramer::new(8);
        let mut input: &[u8] = b"a\r\nbb\nccc";
        let mut seen = Vec::new();
        loop {
            let (flow, consumed) = framer.feed(input, |frame| {
                seen.push(format!("{frame:?}"));
                Flow::Wait
            });
            input = &input[consumed..];
            if flow == Flow::Continue {
                break;
            }
            assert_eq!(flow, Flow::Wait);
        }
        assert!(input.is_empty());
        assert_eq!(seen, [r#"Line([97, 13])"#, r#"Line([98, 98])"#]);
        assert_eq!(framer.finish(), Some(b"ccc".to_vec()));
    }

    /// Bytes biased towards the interesting cases: newlines, multi-byte UTF-8, invalid bytes.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"\n".to_vec()),
            Just("ß".as_bytes().to_vec()),
            Just("€".as_bytes().to_vec()),
            Just("😀".as_bytes().to_vec()),
            Just(b"\r\n".to_vec()),
            any::<u8>().prop_map(|b| vec![b]),
            "[a-z ]{1,6}".prop_map(String::into_bytes),
        ];
        proptest::collection::vec(piece, 0..60).prop_map(|pieces| pieces.concat())
    }

    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut pieces = Vec::new();
        let mut from = 0;
        for point in points.into_iter().chain([bytes.len()]) {
            pieces.push(bytes[from..point].to_vec());
            from = point;
        }
        pieces
    }

    /// The plain definition: each valid character through `char::to_uppercase`, each
    /// invalid byte unchanged. The fast path must give exactly this.
    fn reference_uppercase(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.utf8_chunks() {
            for c in chunk.valid().chars() {
                out.extend(c.to_uppercase().collect::<String>().into_bytes());
            }
            out.extend_from_slice(chunk.invalid());
        }
        out
    }

    #[test]
    fn invalid_sequences_go_back_unchanged_wherever_they_fall() {
        let invalid: [&[u8]; 11] = [
            // Overlong forms of letters: decoded, they would be uppercased.
            b"\xc1\xa1",         // 'a' in two bytes
            b"\xe0\x81\xa1",     // 'a' in three bytes
            b"\xf0\x80\x83\xa9", // 'é' in four bytes
            b"\xed\xa0\x80",     // a surrogate
            b"\xf4\x90\x80\x80", // past U+10FFFF
            b"\xf5\x80\x80\x80", // a byte that never leads
            b"\xff\xfe",
            b"\xe2\x82", // cut short (and, last in the line, at the very end)
            b"\xe2\x82x\xc3",
            b"\x80\xbf\xc3\xa9", // stray continuation bytes, then a valid "é"
            "ß€😀ΐ".as_bytes(),
        ];
        // Around the 64-byte blocks in which lead bytes are looked for, and the end.
        for pad in [0, 1, 55, 60, 61, 62, 63, 64, 65, 127] {
            for bad in invalid {
                let line = [&b"x".repeat(pad)[..], bad, b"tail", bad].concat();
                let mut fast = Vec::new();
                uppercase_line(&line, &mut fast);
                assert_eq!(fast, reference_uppercase(&line), "{line:x?}");
            }
        }
    }

    #[test]
    fn no_uppercase_is_longer_than_the_room_reserved_for_it() {
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let upper: String = c.to_uppercase().collect();
            assert!(upper.len() <= c.len_utf8() * MAX_GROWTH, "{c:?}");
            // A Mapping word holds six bytes and the length.
            assert!(upper.len() <= non_ascii::WORD - 2, "{c:?}");
        }
        let worst = "ΐ".repeat(1000);
        assert_eq!(upper(&worst).len(), worst.len() * MAX_GROWTH);
    }

    #[test]
    fn every_code_point_is_uppercased_as_the_definition_says() {
        let all: String = (0..=0x10FFFFu32).filter_map(char::from_u32).collect();
        for piece in all.as_bytes().chunks(4096) {
            let mut fast = Vec::new();
            uppercase_line(piece, &mut fast);
            assert_eq!(fast, reference_uppercase(piece));
        }
    }

    proptest! {
        #[test]
        fn the_fast_uppercase_equals_the_plain_definition(
            bytes in stream(),
            text in "\\PC{0,40}",
        ) {
            let mut fast = Vec::new();
            uppercase_line(&bytes, &mut fast);
            prop_assert_eq!(fast, reference_uppercase(&bytes));
            let mut fast = Vec::new();
            uppercase_line(text.as_bytes(), &mut fast);
            prop_assert_eq!(fast, reference_uppercase(text.as_bytes()));
        }

        #[test]
        fn uppercaser_output_does_not_depend_on_read_splits(
            bytes in stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut whole = Vec::new();
            uppercase_line(&bytes, &mut whole);
            let mut up = Uppercaser::default();
            let mut pieces = Vec::new();
            for piece in split(&bytes, &cuts) {
                up.feed(&piece, &mut pieces);
            }
            up.finish(&mut pieces);
            prop_assert_eq!(pieces, whole);
        }

        #[test]
        fn framer_output_does_not_depend_on_read_splits(
            bytes in stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max_line in 1usize..24,
        ) {
            let mut one = LineFramer::new(max_line);
            let mut expected = frames(&mut one, &bytes);
            expected.extend(one.finish().map(Some));
            let mut many = LineFramer::new(max_line);
            let mut got = Vec::new();
            for piece in split(&bytes, &cuts) {
                got.extend(frames(&mut many, &piece));
            }
            got.extend(many.finish().map(Some));
            prop_assert_eq!(got, expected);
        }
    }
}
