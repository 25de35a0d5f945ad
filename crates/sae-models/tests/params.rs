//! Parameter counts against the exact integers of SPEC §2 (the paper's printed counts in the
//! authors' Keras convention, and PyTorch-style trainable counts).

use sae_models::{config, ModelConfig, PaperPreset};

fn counts(name: &str, classes: usize) -> (usize, usize) {
    let c = config(name, classes).unwrap().param_counts().unwrap();
    (c.keras, c.trainable)
}

#[test]
fn bottleneck_1111_matches_the_paper_at_10_classes() {
    assert_eq!(counts("resnet14b", 10), (8_065_418, 8_036_426));
    assert_eq!(counts("seresnet14b", 10), (8_417_538, 8_388_546));
    assert_eq!(counts("senetv2_resnet14b", 10), (9_462_378, 9_433_386));
}

#[test]
fn bottleneck_3463_matches_the_paper_at_20_and_100_classes() {
    assert_eq!(counts("resnet50", 20).0, 23_628_692);
    assert_eq!(counts("seresnet50", 20).0, 24_901_740);
    assert_eq!(counts("senetv2_resnet50", 20).0, 28_675_572);
    assert_eq!(counts("resnet50", 100), (23_792_612, 23_712_932));
    assert_eq!(counts("seresnet50", 100), (25_065_660, 24_985_980));
    assert_eq!(counts("senetv2_resnet50", 100), (28_839_492, 28_759_812));
}

#[test]
fn module_deltas_match_spec() {
    for classes in [10, 20, 100] {
        let (base, _) = counts("resnet14b", classes);
        assert_eq!(counts("seresnet14b", classes).0 - base, 352_120);
        assert_eq!(counts("senetv2_resnet14b", classes).0 - base, 1_396_960);
        let (base, _) = counts("resnet50", classes);
        assert_eq!(counts("seresnet50", classes).0 - base, 1_273_048);
        assert_eq!(counts("senetv2_resnet50", classes).0 - base, 5_046_880);
    }
}

#[test]
fn mobilenet_v1_matches_keras() {
    // Keras: 3,228,864 numbers without the head; BatchNorm channels sum to 10,976 × … (each
    // BN has 4 vectors in Keras, 2 trainable in PyTorch).
    let bn_channels: usize = 32
        + [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
            .iter()
            .zip([32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024])
            .map(|(out, inp)| out + inp)
            .sum::<usize>();
    for (classes, keras) in [(10, 3_239_114), (20, 3_249_364), (100, 3_228_864 + 1024 * 100 + 100)] {
        assert_eq!(counts("mobilenet_v1", classes), (keras, keras - 2 * bn_channels), "{classes} classes");
    }
}

#[test]
fn counts_do_not_depend_on_gate_or_stem_and_presets_keep_them() {
    let cfg = config("senetv2_resnet50", 20).unwrap();
    let base = cfg.param_counts().unwrap();
    for gate in [sae_models::Gate::S, sae_models::Gate::OnePlusS] {
        let c = ModelConfig { gate, ..cfg.clone() };
        assert_eq!(c.param_counts().unwrap(), base);
    }
    let preset = cfg.clone().with_paper_preset(PaperPreset::Cifar100Coarse);
    assert_eq!(preset.num_classes, 20);
    assert!(preset.conv_bias);
    let c = preset.param_counts().unwrap();
    assert_eq!(c.keras, 28_675_572);
    // With conv biases the trainable count includes them: Keras total minus running stats.
    assert!(c.trainable > base.trainable);
}
