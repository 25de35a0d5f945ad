//! Candle's bf16 `add`, which runs on the workspace's patched candle-core
//! (`vendor/candle-core/PATCH.md`): its AVX loads and stores of bf16 must give, bit for bit,
//! the sum rounded once to nearest even (`bf16::from_f32` of the f32 sum), on every kind of
//! value: ties, subnormals, the largest finite values, infinities and NaNs.

use candle_core::{Device, Tensor};
use half::bf16;

/// Special values and deterministic pseudo-random bit patterns of every exponent.
fn operands(len: usize, seed: u64) -> Vec<bf16> {
    let special = [
        0.0,
        -0.0,
        1.0,
        -1.5,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        -3e-39,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0 + 1.0 / 128.0,
        3.0e38,
    ];
    let mut state = seed;
    (0..len)
        .map(|i| match special.get(i % 64) {
            Some(&v) => bf16::from_f32(v),
            None => {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                bf16::from_bits((state >> 48) as u16)
            }
        })
        .collect()
}

#[test]
fn bf16_add_rounds_the_f32_sum_to_nearest_even() {
    // Not a multiple of the vector width (the scalar tail too), and long enough for the
    // parallel path.
    let len = 200_003;
    let (a, b) = (operands(len, 1), operands(len, 2));
    let sum = Tensor::new(a.as_slice(), &Device::Cpu)
        .unwrap()
        .add(&Tensor::new(b.as_slice(), &Device::Cpu).unwrap())
        .unwrap()
        .to_vec1::<bf16>()
        .unwrap();
    let mut ties = 0;
    for (i, ((&x, &y), &got)) in a.iter().zip(&b).zip(&sum).enumerate() {
        let exact = x.to_f32() + y.to_f32();
        let want = bf16::from_f32(exact);
        if exact.to_bits() & 0xffff == 0x8000 {
            ties += 1;
        }
        if want.is_nan() {
            assert!(got.is_nan(), "[{i}] {x} + {y}: {got}, want NaN");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "[{i}] {x} + {y} = {exact:e}: {got} ({:#06x}), want {want} ({:#06x})",
                got.to_bits(),
                want.to_bits()
            );
        }
    }
    // The sums of random bf16 pairs include exact ties, so round-half-to-even is exercised.
    assert!(ties > 100, "only {ties} ties");
}
