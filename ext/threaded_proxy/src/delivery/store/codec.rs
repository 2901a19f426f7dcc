//! The header list of a stored request as one blob, so a row holds its
//! headers in a single column whichever backend stores it, with names and
//! values kept byte for byte (repeated names and non-UTF-8 values too).

use super::{StoreError, StoreResult};

/// Headers as one blob: per pair, u32 name length, name, u32 value length,
/// value (big-endian lengths).
pub fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// The inverse of [`encode_headers`]; a truncated blob or a name that is
/// not UTF-8 is [`StoreError::Corrupt`].
pub fn decode_headers(mut data: &[u8]) -> StoreResult<Vec<(String, Vec<u8>)>> {
    fn take<'a>(data: &mut &'a [u8]) -> StoreResult<&'a [u8]> {
        let corrupt = || StoreError::Corrupt("truncated headers".into());
        let len_bytes: [u8; 4] = data
            .get(..4)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let field = data.get(4..4 + len).ok_or_else(corrupt)?;
        *data = &data[4 + len..];
        Ok(field)
    }
    let mut headers = Vec::new();
    while !data.is_empty() {
        let name = String::from_utf8(take(&mut data)?.to_vec())
            .map_err(|_| StoreError::Corrupt("header name is not UTF-8".into()))?;
        let value = take(&mut data)?.to_vec();
        headers.push((name, value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let headers = vec![("A".to_owned(), b"1".to_vec()), ("B".to_owned(), vec![0, 255])];
        assert_eq!(decode_headers(&encode_headers(&headers)).unwrap(), headers);
        assert!(decode_headers(&[0, 0, 0, 9, b'x']).is_err());
    }
}
