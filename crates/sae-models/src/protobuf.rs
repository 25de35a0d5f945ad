//! The few pieces of protocol-buffer encoding that the ONNX export ([`crate::onnx`]) and
//! `sae-train`'s TensorBoard event files write by hand: varints, and varint and
//! length-delimited fields.

/// `v` as a base-128 varint.
pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `field` holding the varint `v` (wire type 0).
pub fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

/// Field `field` holding `bytes` (wire type 2: a string, bytes or an embedded message).
pub fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of the protobuf encoding guide: 150 in field 1 is `08 96 01`, and the
    /// string "testing" in field 2 is `12 07 74 65 73 74 69 6e 67`.
    #[test]
    fn fields_encode_as_the_protobuf_guide_shows() {
        let mut out = Vec::new();
        field_varint(&mut out, 1, 150);
        assert_eq!(out, [0x08, 0x96, 0x01]);
        let mut out = Vec::new();
        field_bytes(&mut out, 2, b"testing");
        assert_eq!(out, [0x12, 0x07, 0x74, 0x65, 0x73, 0x74, 0x69, 0x6e, 0x67]);
    }
}
