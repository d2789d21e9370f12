//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer sends first
//! on each connection it forwards, naming the client it speaks for. Parsing only, no I/O:
//! the connection peeks at its socket and calls [`parse`] with everything that has arrived
//! until the answer is complete or wrong, then consumes exactly [`Parsed::Complete::len`]
//! bytes, so the session (or a TLS handshake) starts at the client's first byte.
//!
//! [`parse`] is incremental in the only way that matters for a header torn across reads: once
//! it gives an answer other than [`Parsed::Incomplete`] for some bytes, every longer input
//! starting with them gets the same answer. Garbage is refused from its first wrong byte;
//! a header longer than [`MAX_HEADER_BYTES`] is refused without waiting for its end.
//!
//! What is accepted (the specification, haproxy.org/download/2.6/doc/proxy-protocol.txt):
//! - v1: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` (one space between fields, addresses in
//!   their family's text form, ports 0-65535 without leading zeros), or `PROXY UNKNOWN`
//!   and anything up to `\r\n`; at most 107 bytes.
//! - v2: the 12-byte signature, version 2, command LOCAL (the proxy speaking for itself, e.g.
//!   a health check) or PROXY, and a length; TCP over IPv4 or IPv6 gives the addresses, other
//!   valid families (UDP, Unix, unspecified) fall back to the connection's own peer, as the
//!   specification requires of a receiver that does not use them. TLVs are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 header's start.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, `\r\n` included (the specification's bound).
pub const V1_MAX_BYTES: usize = 107;
/// The v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED_BYTES: usize = 16;
/// The longest header accepted: a v2 header whose TLVs would take more is refused (HAProxy
/// sends a few dozen bytes of TLVs at most with the usual options).
pub const MAX_HEADER_BYTES: usize = 4096;

/// Which version of the protocol a header spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy forwards a TCP connection from `source` (the client) to `destination`
    /// (the address the client reached on the proxy).
    Proxied {
        version: Version,
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy speaks for itself (v2 LOCAL: a health check) or does not say for whom
    /// (v1 UNKNOWN, a v2 family other than TCP): the connection's own peer stands.
    Unknown { version: Version },
}

impl Header {
    /// The client, if the header names one.
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            Header::Proxied { source, .. } => Some(*source),
            Header::Unknown { .. } => None,
        }
    }
}

/// How a connection's PROXY header ended, as counted per service
/// (`forkpool_proxy_headers_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted: a v1 or v2 header naming the client.
    V1,
    V2,
    /// Accepted: a header naming no client (v2 LOCAL, v1 UNKNOWN, ...).
    Local,
    /// Refused: the connection did not start with a header.
    Missing,
    /// Refused: a header that does not parse, or is too long.
    Malformed,
    /// Refused: the peer closed before the header's end.
    Truncated,
    /// Refused: the header was not complete within the time allowed.
    Timeout,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::V1,
        Outcome::V2,
        Outcome::Local,
        Outcome::Missing,
        Outcome::Malformed,
        Outcome::Truncated,
        Outcome::Timeout,
    ];

    /// Its label value in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::V1 => "v1",
            Outcome::V2 => "v2",
            Outcome::Local => "local",
            Outcome::Missing => "missing",
            Outcome::Malformed => "malformed",
            Outcome::Truncated => "truncated",
            Outcome::Timeout => "timeout",
        }
    }

    /// Position in per-outcome arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn of_header(header: &Header) -> Outcome {
        match header {
            Header::Proxied {
                version: Version::V1,
                ..
            } => Outcome::V1,
            Header::Proxied {
                version: Version::V2,
                ..
            } => Outcome::V2,
            Header::Unknown { .. } => Outcome::Local,
        }
    }

    pub fn of_error(error: &HeaderError) -> Outcome {
        match error {
            HeaderError::Missing => Outcome::Missing,
            HeaderError::Malformed(_) | HeaderError::TooLong(_) => Outcome::Malformed,
        }
    }
}

/// The answer for the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// So far a header: more bytes are needed.
    Incomplete,
    /// A header of `len` bytes (the input's first `len`; what follows is the client's).
    Complete { header: Header, len: usize },
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The connection does not start with a PROXY header at all.
    #[error("no PROXY protocol header (the connection starts with other bytes)")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
}

/// Parses the start of a connection (see the module's doc for what is accepted).
pub fn parse(input: &[u8]) -> Result<Parsed, HeaderError> {
    let Some(&first) = input.first() else {
        return Ok(Parsed::Incomplete);
    };
    if first == V2_SIGNATURE[0] {
        parse_v2(input)
    } else if first == V1_PREFIX[0] {
        parse_v1(input)
    } else {
        Err(HeaderError::Missing)
    }
}

/// Does `input` start like `expected` as far as it goes (true if `input` is shorter)?
fn starts_like(input: &[u8], expected: &[u8]) -> bool {
    let n = input.len().min(expected.len());
    input[..n] == expected[..n]
}

fn parse_v1(input: &[u8]) -> Result<Parsed, HeaderError> {
    if !starts_like(input, V1_PREFIX) {
        return Err(HeaderError::Missing);
    }
    let window = &input[..input.len().min(V1_MAX_BYTES)];
    // Only printable ASCII and the final CR LF may appear: anything else is refused at once.
    if let Some(at) = window.iter().position(|&b| !(b' '..=b'~').contains(&b)) {
        return match (window[at], window.get(at + 1)) {
            (b'\r', Some(b'\n')) => v1_line(&window[..at]).map(|header| Parsed::Complete {
                header,
                len: at + 2,
            }),
            // A CR as the last byte the bound allows leaves no room for its LF.
            (b'\r', None) if window.len() < V1_MAX_BYTES => Ok(Parsed::Incomplete),
            (b'\r', None) => Err(HeaderError::TooLong(V1_MAX_BYTES)),
            _ => Err(HeaderError::Malformed(
                "v1: a byte other than printable ASCII",
            )),
        };
    }
    if window.len() == V1_MAX_BYTES {
        return Err(HeaderError::TooLong(V1_MAX_BYTES));
    }
    Ok(Parsed::Incomplete)
}

/// A v1 line without its CR LF.
fn v1_line(line: &[u8]) -> Result<Header, HeaderError> {
    let malformed = HeaderError::Malformed;
    let text = std::str::from_utf8(line).map_err(|_| malformed("v1: not ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Header::Unknown {
            version: Version::V1,
        }),
        ["PROXY", family @ ("TCP4" | "TCP6"), source, destination, sport, dport] => {
            let ip = |text: &str| -> Result<IpAddr, HeaderError> {
                let ip = if *family == "TCP4" {
                    text.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    text.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| malformed("v1: an address not of the family named"))
            };
            Ok(Header::Proxied {
                version: Version::V1,
                source: SocketAddr::new(ip(source)?, v1_port(sport)?),
                destination: SocketAddr::new(ip(destination)?, v1_port(dport)?),
            })
        }
        ["PROXY", "TCP4" | "TCP6", ..] => Err(malformed("v1: expected 6 fields")),
        _ => Err(malformed("v1: protocol is not TCP4, TCP6 or UNKNOWN")),
    }
}

/// A v1 port: 0-65535 in decimal, no sign, no leading zero.
fn v1_port(text: &str) -> Result<u16, HeaderError> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    let canonical = text == "0" || !text.starts_with('0');
    text.parse()
        .ok()
        .filter(|_| digits && canonical)
        .ok_or(HeaderError::Malformed("v1: a port is not 0-65535"))
}

/// v2 commands and families (the high and low nibbles of bytes 12 and 13).
const V2_VERSION: u8 = 0x2;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

fn parse_v2(input: &[u8]) -> Result<Parsed, HeaderError> {
    if !starts_like(input, &V2_SIGNATURE) {
        return Err(HeaderError::Missing);
    }
    let malformed = HeaderError::Malformed;
    if let Some(&version_command) = input.get(12) {
        if version_command >> 4 != V2_VERSION {
            return Err(malformed("v2: version is not 2"));
        }
        if !matches!(version_command & 0xf, CMD_LOCAL | CMD_PROXY) {
            return Err(malformed("v2: command is neither LOCAL nor PROXY"));
        }
    }
    if let Some(&family) = input.get(13) {
        // Address family 0-3 (unspecified, IPv4, IPv6, Unix), protocol 0-2 (unspecified,
        // stream, datagram); an unspecified family only with an unspecified protocol.
        let (address, protocol) = (family >> 4, family & 0xf);
        if address > 3 || protocol > 2 || (address == 0) != (protocol == 0) {
            return Err(malformed("v2: unknown address family or protocol"));
        }
    }
    let Some(length) = input.get(14..V2_FIXED_BYTES) else {
        return Ok(Parsed::Incomplete);
    };
    let len = V2_FIXED_BYTES + usize::from(u16::from_be_bytes([length[0], length[1]]));
    if len > MAX_HEADER_BYTES {
        return Err(HeaderError::TooLong(MAX_HEADER_BYTES));
    }
    let Some(header) = input.get(..len) else {
        return Ok(Parsed::Incomplete);
    };
    let addresses = &header[V2_FIXED_BYTES..];
    let unknown = Header::Unknown {
        version: Version::V2,
    };
    let header = match (header[12] & 0xf, header[13]) {
        (CMD_LOCAL, _) => unknown,
        (_, TCP_OVER_IPV4) => {
            let a = addresses
                .get(..12)
                .ok_or(malformed("v2: IPv4 addresses cut short"))?;
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            v2_proxied(ip(0), ip(4), &a[8..12])
        }
        (_, TCP_OVER_IPV6) => {
            let a = addresses
                .get(..36)
                .ok_or(malformed("v2: IPv6 addresses cut short"))?;
            let ip = |at: usize| {
                let octets: [u8; 16] = a[at..at + 16].try_into().expect("16 bytes sliced");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            v2_proxied(ip(0), ip(16), &a[32..36])
        }
        _ => unknown,
    };
    Ok(Parsed::Complete { header, len })
}

/// A v2 PROXY header's addresses; `ports` is the source then the destination port.
fn v2_proxied(source: IpAddr, destination: IpAddr, ports: &[u8]) -> Header {
    Header::Proxied {
        version: Version::V2,
        source: SocketAddr::new(source, u16::from_be_bytes([ports[0], ports[1]])),
        destination: SocketAddr::new(destination, u16::from_be_bytes([ports[2], ports[3]])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A v2 header: `command` (0 LOCAL, 1 PROXY), `family`, then `body` (addresses, TLVs).
    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_ipv4() -> Vec<u8> {
        // 192.0.2.7:51234 -> 198.51.100.1:7879, then a NOOP TLV of 3 bytes.
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend_from_slice(&51234u16.to_be_bytes());
        body.extend_from_slice(&7879u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x03, 1, 2, 3]);
        v2(CMD_PROXY, TCP_OVER_IPV4, &body)
    }

    fn v2_ipv6() -> Vec<u8> {
        let mut body = "2001:db8::7"
            .parse::<Ipv6Addr>()
            .expect("an address")
            .octets()
            .to_vec();
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&[0, 80, 0x1e, 0xc7]);
        v2(CMD_PROXY, TCP_OVER_IPV6, &body)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a socket address")
    }

    /// Valid headers and what they say.
    fn valid() -> Vec<(Vec<u8>, Header)> {
        let v1 = |source: &str, destination: &str| Header::Proxied {
            version: Version::V1,
            source: addr(source),
            destination: addr(destination),
        };
        let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let longest_v1 = format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n");
        assert_eq!(
            longest_v1.len(),
            V1_MAX_BYTES,
            "the specification's worst case"
        );
        vec![
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 7879\r\n".to_vec(),
                v1("192.0.2.7:51234", "198.51.100.1:7879"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 ::1 0 7879\r\n".to_vec(),
                v1("[2001:db8::7]:0", "[::1]:7879"),
            ),
            (
                format!("PROXY TCP6 {ffff} {ffff} 65535 65535\r\n").into_bytes(),
                v1(&format!("[{ffff}]:65535"), &format!("[{ffff}]:65535")),
            ),
            (
                longest_v1.into_bytes(),
                Header::Unknown {
                    version: Version::V1,
                },
            ),
            (
                b"PROXY UNKNOWN\r\n".to_vec(),
                Header::Unknown {
                    version: Version::V1,
                },
            ),
            (
                b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n".to_vec(),
                Header::Unknown {
                    version: Version::V1,
                },
            ),
            (
                v2_ipv4(),
                Header::Proxied {
                    version: Version::V2,
                    source: addr("192.0.2.7:51234"),
                    destination: addr("198.51.100.1:7879"),
                },
            ),
            (
                v2_ipv6(),
                Header::Proxied {
                    version: Version::V2,
                    source: addr("[2001:db8::7]:80"),
                    destination: addr("[::1]:7879"),
                },
            ),
            (
                v2(CMD_LOCAL, 0x00, &[]),
                Header::Unknown {
                    version: Version::V2,
                },
            ),
            (
                // A LOCAL header may carry addresses: they are ignored.
                v2(CMD_LOCAL, TCP_OVER_IPV4, &[0; 12]),
                Header::Unknown {
                    version: Version::V2,
                },
            ),
            (
                // Unix stream sockets: valid, but no client address to use.
                v2(CMD_PROXY, 0x31, &[0; 216]),
                Header::Unknown {
                    version: Version::V2,
                },
            ),
        ]
    }

    #[test]
    fn every_valid_header_parses_at_its_end_and_not_before() {
        for (bytes, header) in valid() {
            let len = bytes.len();
            for cut in 0..len {
                assert_eq!(
                    parse(&bytes[..cut]),
                    Ok(Parsed::Incomplete),
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            let mut followed = bytes.clone();
            followed.extend_from_slice(b"PING\r\n");
            for input in [&bytes, &followed] {
                assert_eq!(parse(input), Ok(Parsed::Complete { header, len }));
            }
        }
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        let malformed = |input: &[u8]| match parse(input) {
            Err(HeaderError::Malformed(reason)) => reason,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        };
        for missing in [
            &b"GET / HTTP/1.0\r\n"[..],
            b"PING\n",
            b"\r\n\r\nQUIT\n",
            b"PROXy TCP4",
            b"\x00",
            b"\x16\x03\x01",
        ] {
            assert_eq!(parse(missing), Err(HeaderError::Missing), "{missing:?}");
        }
        for (input, reason) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..], "printable"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 fields"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "6 fields"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "family"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "family"),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "family"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4"),
            (b"PROXY \r\n", "TCP4"),
            (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "printable"),
            (b"PROXY TCP4 \xc3\xa9", "printable"),
        ] {
            let got = malformed(input);
            assert!(got.contains(reason), "{input:?}: {got}");
        }
        let mut wrong_version = v2_ipv4();
        wrong_version[12] = 0x11;
        assert!(malformed(&wrong_version).contains("version"));
        let mut wrong_command = v2_ipv4();
        wrong_command[12] = 0x22;
        assert!(malformed(&wrong_command).contains("command"));
        for family in [0x41, 0x13, 0x01, 0x10] {
            let mut bad = v2_ipv4();
            bad[13] = family;
            assert!(malformed(&bad).contains("family"), "{family:#x}");
        }
        assert!(malformed(&v2(CMD_PROXY, TCP_OVER_IPV4, &[0; 11])).contains("IPv4"));
        assert!(malformed(&v2(CMD_PROXY, TCP_OVER_IPV6, &[0; 35])).contains("IPv6"));
    }

    #[test]
    fn a_header_too_long_is_refused_before_its_end() {
        let v1 = [&b"PROXY UNKNOWN "[..], &[b'x'; 200]].concat();
        assert_eq!(
            parse(&v1[..V1_MAX_BYTES]),
            Err(HeaderError::TooLong(V1_MAX_BYTES))
        );
        assert_eq!(parse(&v1[..V1_MAX_BYTES - 1]), Ok(Parsed::Incomplete));
        let cr_last = [&v1[..V1_MAX_BYTES - 1], b"\r\n"].concat();
        assert_eq!(
            parse(&cr_last),
            Err(HeaderError::TooLong(V1_MAX_BYTES)),
            "its LF would be byte 108"
        );
        let longest = v2(CMD_PROXY, TCP_OVER_IPV4, &[0; MAX_HEADER_BYTES - 16]);
        assert!(matches!(
            parse(&longest),
            Ok(Parsed::Complete { len, .. }) if len == MAX_HEADER_BYTES
        ));
        let too_long = v2(CMD_PROXY, TCP_OVER_IPV4, &[0; MAX_HEADER_BYTES - 15]);
        assert_eq!(
            parse(&too_long[..V2_FIXED_BYTES]),
            Err(HeaderError::TooLong(MAX_HEADER_BYTES))
        );
    }

    /// Inputs near the valid ones: each valid header with one byte changed, cut, or
    /// followed by anything.
    fn near_valid() -> impl Strategy<Value = Vec<u8>> {
        let headers: Vec<Vec<u8>> = valid().into_iter().map(|(bytes, _)| bytes).collect();
        (
            proptest::sample::select(headers),
            any::<prop::sample::Index>(),
            any::<u8>(),
            0usize..200,
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(mut bytes, at, byte, cut, tail)| {
                let at = at.index(bytes.len());
                bytes[at] = byte;
                bytes.truncate(bytes.len().saturating_sub(cut % 4 * cut));
                bytes.extend_from_slice(&tail);
                bytes
            })
    }

    fn arbitrary_input() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            near_valid(),
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|tail| [V1_PREFIX, &tail].concat()),
            prop::collection::vec(any::<u8>(), 0..300)
                .prop_map(|tail| [&V2_SIGNATURE[..], &tail].concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Torn across reads: whatever the cut, the first answer that is not "incomplete"
        /// is the answer for the whole input; a complete header never claims bytes that did
        /// not arrive, nor more than the bound.
        #[test]
        fn any_input_gets_one_answer_however_it_is_cut(input in arbitrary_input()) {
            let whole = parse(&input);
            if let Ok(Parsed::Complete { len, .. }) = whole {
                prop_assert!(len <= input.len() && len <= MAX_HEADER_BYTES);
            }
            let mut settled = None;
            for cut in 0..=input.len() {
                let answer = parse(&input[..cut]);
                match settled {
                    Some(first) => prop_assert_eq!(answer, first, "cut at {}", cut),
                    None if answer != Ok(Parsed::Incomplete) => settled = Some(answer),
                    None => {}
                }
            }
            prop_assert_eq!(settled.unwrap_or(Ok(Parsed::Incomplete)), whole);
        }
    }
}
