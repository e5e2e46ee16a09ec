//! PEM: a small, strict reader, and the `pem` crate's writer.
//!
//! The reader is written here because the `pem` crate refuses base64 without its `=` padding, which
//! people paste (tested), and its errors ("malformedframing", "invalid data") do not say what is
//! wrong; here every failure has a precise, content-free message ("truncated base64", "no matching
//! END line") and encryption headers (`Proc-Type: 4,ENCRYPTED`) are seen.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Accepts base64 with or without trailing `=`, as people paste both; rejects stray bits.
pub(crate) const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One decoded PEM block.
pub(crate) struct Block {
    /// The label between `BEGIN ` and `-----`, e.g. `CERTIFICATE`.
    pub label: String,
    /// The decoded body.
    pub der: Vec<u8>,
    /// RFC 1421 headers said `Proc-Type: 4,ENCRYPTED` (legacy OpenSSL key encryption).
    pub encrypted_header: bool,
}

/// Where in the text a PEM problem is; rendered into the error detail.
#[derive(Debug)]
pub(crate) struct PemProblem(pub String);

const BEGIN: &str = "-----BEGIN ";
const DASHES: &str = "-----";

/// Whether the text looks like PEM at all (used to choose between PEM and base64 DER).
pub(crate) fn looks_like_pem(text: &str) -> bool {
    text.contains(BEGIN)
}

/// Undo a common storage mistake: PEM kept with literal `\n` escape sequences instead of newlines.
/// Base64 and PEM armour never contain a backslash, so the replacement cannot corrupt valid input.
pub(crate) fn normalize(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains("\\n") || text.contains("\\r") {
        std::borrow::Cow::Owned(text.replace("\\r", "").replace("\\n", "\n"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Parse every PEM block in `text`, in order. Text outside blocks (OpenSSL "Bag Attributes",
/// "subject=" lines, comments) is ignored. Returns an empty list when there is no block.
pub(crate) fn parse_blocks(text: &str) -> Result<Vec<Block>, PemProblem> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let n = blocks.len() + 1;
        let after_begin = &rest[start + BEGIN.len()..];
        let Some(label_end) = after_begin.find(DASHES) else {
            return Err(PemProblem(format!(
                "block {n}: BEGIN line is not terminated by -----"
            )));
        };
        let label = after_begin[..label_end].trim();
        if label.is_empty() || !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(PemProblem(format!("block {n}: malformed BEGIN line")));
        }
        let body_and_rest = &after_begin[label_end + DASHES.len()..];
        let end_marker = format!("-----END {label}-----");
        let Some(end_pos) = body_and_rest.find(&end_marker) else {
            return Err(PemProblem(format!(
                "block {n} ({label}): no matching \"-----END {label}-----\" line (truncated?)"
            )));
        };
        let body = &body_and_rest[..end_pos];
        if body.contains(BEGIN) {
            return Err(PemProblem(format!(
                "block {n} ({label}): a BEGIN line appears before its END line (truncated?)"
            )));
        }
        let (der, encrypted_header) =
            decode_body(body).map_err(|what| PemProblem(format!("block {n} ({label}): {what}")))?;
        blocks.push(Block {
            label: label.to_owned(),
            der,
            encrypted_header,
        });
        rest = &body_and_rest[end_pos + end_marker.len()..];
    }
    Ok(blocks)
}

/// Decode a block body: optional RFC 1421 headers (lines with a colon), then base64.
fn decode_body(body: &str) -> Result<(Vec<u8>, bool), String> {
    let mut encrypted = false;
    let mut b64 = String::with_capacity(body.len());
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // Base64 has no colon, so a line with one is a header.
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("Proc-Type")
                && value.to_ascii_uppercase().contains("ENCRYPTED")
            {
                encrypted = true;
            }
            continue;
        }
        // Whitespace inside a line appears when PEM was pasted onto one line.
        b64.extend(line.chars().filter(|c| !c.is_whitespace()));
    }
    if b64.is_empty() {
        return Err("empty block (no base64 body)".to_owned());
    }
    let der = decode_base64(&b64)?;
    Ok((der, encrypted))
}

/// Decode base64 (whitespace already removed) with a content-free error message.
pub(crate) fn decode_base64(b64: &str) -> Result<Vec<u8>, String> {
    LENIENT_B64.decode(b64).map_err(|e| {
        use base64::DecodeError as E;
        match e {
            E::InvalidByte(offset, _) => format!("invalid character in base64 at offset {offset}"),
            E::InvalidLength(_) => {
                "truncated base64 (length is not a whole number of base64 groups)".to_owned()
            }
            E::InvalidLastSymbol(_, _) => {
                "truncated or corrupt base64 (bad final symbol)".to_owned()
            }
            E::InvalidPadding => "corrupt base64 padding".to_owned(),
        }
    })
}

/// Encode one PEM block with 64-character lines and LF endings, the form every TLS stack reads
/// (the `pem` crate).
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer this replaced, kept here to prove the output did not change by a byte: a
    /// different rendering would rewrite every Secret on upgrade.
    fn encode_by_hand(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.extend(chunk.iter().map(|&b| char::from(b)));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    #[test]
    fn encoding_is_byte_for_byte_what_secrets_already_hold() {
        for length in [1, 47, 48, 49, 95, 96, 97, 500, 1217] {
            let der: Vec<u8> = (0..length).map(|i| (i * 7 % 251) as u8).collect();
            assert_eq!(
                encode("CERTIFICATE", &der),
                encode_by_hand("CERTIFICATE", &der)
            );
        }
    }

    #[test]
    fn what_is_written_reads_back() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let blocks = parse_blocks(&encode("PRIVATE KEY", &der)).map_err(|p| p.0);
        let blocks = blocks.unwrap_or_default();
        assert_eq!(blocks.len(), 1);
        assert_eq!(
            (blocks[0].label.as_str(), blocks[0].der.as_slice()),
            ("PRIVATE KEY", der.as_slice())
        );
    }
}
