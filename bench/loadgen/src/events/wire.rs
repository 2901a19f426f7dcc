//! The wire side of the `events` mode: chunked transfer decoding, SSE
//! line splitting and the response head, each fed bytes as they arrive
//! (split anywhere).

use crate::http::Failure;

/// Undoes chunked transfer coding (ActionController::Live under Puma is
/// chunked; the hijacked rows are not).
pub enum Dechunk {
    Size(Vec<u8>),
    Data(u64),
    Crlf(u8),
    Done,
}

impl Dechunk {
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Failure> {
        while !input.is_empty() {
            match self {
                Dechunk::Size(line) => {
                    let byte = input[0];
                    input = &input[1..];
                    if byte != b'\n' {
                        if line.len() > 64 {
                            return Err(Failure::BadResponse);
                        }
                        line.push(byte);
                        continue;
                    }
                    let text = std::str::from_utf8(line).map_err(|_| Failure::BadResponse)?;
                    let hex = text.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16).map_err(|_| Failure::BadResponse)?;
                    *self = if size == 0 {
                        Dechunk::Done
                    } else {
                        Dechunk::Data(size)
                    };
                }
                Dechunk::Data(left) => {
                    let take = (*left).min(input.len() as u64) as usize;
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Dechunk::Crlf(2);
                    }
                }
                Dechunk::Crlf(left) => {
                    input = &input[1..];
                    *left -= 1;
                    if *left == 0 {
                        *self = Dechunk::Size(Vec::new());
                    }
                }
                Dechunk::Done => return Err(Failure::Closed),
            }
        }
        Ok(())
    }
}

/// Splits the event stream into lines and hands each `data: <seq> <ns>`
/// line on; comments (heartbeats), other fields and blank lines are skipped.
pub fn take_events(carry: &mut Vec<u8>, mut each: impl FnMut(u64, u64)) {
    let mut start = 0;
    while let Some(offset) = carry[start..].iter().position(|&b| b == b'\n') {
        let line = &carry[start..start + offset];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data: ") {
            let text = std::str::from_utf8(rest).unwrap_or("");
            let mut parts = text.split(' ');
            if let (Some(Ok(seq)), Some(Ok(ns))) = (
                parts.next().map(str::parse::<u64>),
                parts.next().map(str::parse::<u64>),
            ) {
                each(seq, ns);
            }
        }
        start += offset + 1;
    }
    carry.drain(..start);
}

/// The status, whether the body is chunked, and `group` header's value.
pub fn parse_head(head: &[u8], group: Option<&str>) -> Result<(u16, bool, Option<String>), Failure> {
    let text = std::str::from_utf8(head).map_err(|_| Failure::BadResponse)?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or(Failure::BadResponse)?;
    let (mut chunked, mut value) = (false, None);
    for line in lines {
        let Some((name, v)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if group.is_some_and(|g| name.eq_ignore_ascii_case(g)) {
            value = Some(v.trim().to_owned());
        }
    }
    Ok((status, chunked, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_and_finds_events_split_anywhere() {
        let wire = b"c\r\n: heartbeat\n\r\n14\r\ndata: 16 123456789\n\n\r\n";
        for cut in 1..wire.len() {
            let mut dechunk = Dechunk::Size(Vec::new());
            let (mut carry, mut seen) = (Vec::new(), Vec::new());
            for piece in [&wire[..cut], &wire[cut..]] {
                dechunk.feed(piece, &mut carry).unwrap();
                take_events(&mut carry, |seq, ns| seen.push((seq, ns)));
            }
            assert_eq!(seen, vec![(16, 123456789)], "cut at {cut}");
        }
    }

    #[test]
    fn skips_lines_that_are_not_timed_events() {
        let mut carry = b"event: x\ndata: hello\ndata: 3 4\r\n\n:c\n".to_vec();
        let mut seen = Vec::new();
        take_events(&mut carry, |seq, ns| seen.push((seq, ns)));
        assert_eq!(seen, vec![(3, 4)]);
        assert!(carry.is_empty());
    }

    #[test]
    fn reads_the_group_header() {
        let (status, chunked, group) = parse_head(
            b"HTTP/1.1 200 OK\r\nX-Worker: 42\r\nTransfer-Encoding: chunked",
            Some("x-worker"),
        )
        .unwrap();
        assert_eq!((status, chunked, group.as_deref()), (200, true, Some("42")));
    }
}
