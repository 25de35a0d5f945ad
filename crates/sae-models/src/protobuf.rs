//! The few pieces of protocol-buffer encoding that the ONNX export ([`crate::onnx`]) and
//! `sae-train`'s TensorBoard event files write by hand: varints, and varint, length-delimited
//! and fixed-width (float, double) fields.

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

/// Field `field` holding the float `v` (wire type 5: 4 bytes, little-endian).
pub fn field_f32(out: &mut Vec<u8>, field: u64, v: f32) {
    varint(out, (field << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Field `field` holding the double `v` (wire type 1: 8 bytes, little-endian).
pub fn field_f64(out: &mut Vec<u8>, field: u64, v: f64) {
    varint(out, (field << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of the protobuf encoding guide: 150 in field 1 is `08 96 01`, and the
    /// string "testing" in field 2 is `12 07 74 65 73 74 69 6e 67`; a float 1.0 in field 2 is
    /// `15` and IEEE 754's `3f800000` little-endian, a double 1.0 in field 1 `09` and
    /// `3ff0000000000000` little-endian.
    #[test]
    fn fields_encode_as_the_protobuf_guide_shows() {
        let mut out = Vec::new();
        field_varint(&mut out, 1, 150);
        assert_eq!(out, [0x08, 0x96, 0x01]);
        let mut out = Vec::new();
        field_bytes(&mut out, 2, b"testing");
        assert_eq!(out, [0x12, 0x07, 0x74, 0x65, 0x73, 0x74, 0x69, 0x6e, 0x67]);
        let mut out = Vec::new();
        field_f32(&mut out, 2, 1.0);
        assert_eq!(out, [0x15, 0x00, 0x00, 0x80, 0x3f]);
        let mut out = Vec::new();
        field_f64(&mut out, 1, 1.0);
        assert_eq!(out, [0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
    }
}
