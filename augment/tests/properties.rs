//! Properties of the ops and the pipeline: shapes and ranges, identities, determinism
//! across threads, config validation.

use byol_augment::blur::{BlurScratch, blur_radius, gaussian_blur, gaussian_kernel};
use byol_augment::flip::{hflip, hflip_rgb8};
use byol_augment::grayscale::grayscale;
use byol_augment::solarize::solarize;
use byol_augment::{AugmentConfig, AugmentError, Augmenter, SampleKey, Scratch, ViewOut, ViewSpec};
use rayon::prelude::*;

/// A deterministic synthetic RGB8 image with edges, gradients and noise.
fn synth(w: u32, h: u32, salt: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((w * h * 3) as usize);
    let mut s = 0x1234_5678u32 ^ salt;
    for y in 0..h {
        for x in 0..w {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            v.push(((x * 255) / w) as u8 ^ (s as u8 & 0x1f));
            v.push(((y * 255) / h) as u8);
            v.push(if (x / 16 + y / 16) % 2 == 0 {
                220
            } else {
                (s >> 8) as u8
            });
        }
    }
    v
}

fn run(
    aug: &Augmenter,
    img: &[u8],
    w: u32,
    h: u32,
    key: SampleKey,
    s: &mut Scratch,
) -> [Vec<f32>; 2] {
    let mut a = vec![0f32; aug.view_len()];
    let mut b = vec![0f32; aug.view_len()];
    aug.two_views(
        img,
        w,
        h,
        key,
        s,
        [ViewOut::f32(&mut a), ViewOut::f32(&mut b)],
    )
    .unwrap();
    [a, b]
}

#[test]
fn shapes_ranges_and_u8_output_agree() {
    for size in [224u32, 96, 32] {
        let aug = Augmenter::new(AugmentConfig::byol(size)).unwrap();
        let (w, h) = (256, 192);
        let img = synth(w, h, size);
        let mut s = Scratch::new();
        for i in 0..8 {
            let n = aug.view_len();
            let (mut f1, mut f2, mut u1, mut u2) =
                (vec![9f32; n], vec![9f32; n], vec![7u8; n], vec![7u8; n]);
            let key = SampleKey::new(1, 2, i);
            aug.two_views(
                &img,
                w,
                h,
                key,
                &mut s,
                [
                    ViewOut::both(&mut f1, &mut u1),
                    ViewOut::both(&mut f2, &mut u2),
                ],
            )
            .unwrap();
            for (v, (f, u)) in [(&f1, &u1), (&f2, &u2)].into_iter().enumerate() {
                let spec = aug.spec(v);
                let plane = (size * size) as usize;
                for c in 0..3 {
                    let (m, sd) = (spec.mean[c], spec.std[c]);
                    for p in 0..plane {
                        let x = f[c * plane + p];
                        assert!(x.is_finite());
                        let raw = x * sd + m;
                        assert!(
                            (-1e-5..=1.0 + 1e-5).contains(&raw),
                            "value {raw} out of [0,1]"
                        );
                        let q = u[p * 3 + c] as f32;
                        assert!((q - raw * 255.0).abs() <= 0.51, "u8 {q} vs f32 {raw}");
                    }
                }
            }
            // Only-u8 and only-f32 runs give the same bytes / floats.
            let mut u1b = vec![0u8; n];
            let mut f2b = vec![0f32; n];
            aug.two_views(
                &img,
                w,
                h,
                key,
                &mut s,
                [ViewOut::u8(&mut u1b), ViewOut::f32(&mut f2b)],
            )
            .unwrap();
            assert_eq!(u1, u1b);
            assert_eq!(f2, f2b);
        }
    }
}

#[test]
fn wrong_slot_or_input_sizes_are_errors() {
    let aug = Augmenter::new(AugmentConfig::byol(32)).unwrap();
    let img = synth(40, 30, 0);
    let mut s = Scratch::new();
    let (mut a, mut b) = (vec![0f32; 10], vec![0f32; aug.view_len()]);
    let e = aug.two_views(
        &img,
        40,
        30,
        SampleKey::default(),
        &mut s,
        [ViewOut::f32(&mut a), ViewOut::f32(&mut b)],
    );
    assert!(
        matches!(
            e,
            Err(AugmentError::BadOutput {
                slot: "view1.chw",
                ..
            })
        ),
        "{e:?}"
    );
    let mut a = vec![0f32; aug.view_len()];
    let e = aug.two_views(
        &img,
        41,
        30,
        SampleKey::default(),
        &mut s,
        [ViewOut::f32(&mut a), ViewOut::f32(&mut b)],
    );
    assert!(matches!(e, Err(AugmentError::BadInput(_))), "{e:?}");
    let e = aug.two_views(
        &[],
        0,
        0,
        SampleKey::default(),
        &mut s,
        [ViewOut::f32(&mut a), ViewOut::f32(&mut b)],
    );
    assert!(matches!(e, Err(AugmentError::BadInput(_))), "{e:?}");
}

#[test]
fn tiny_and_odd_sources_work() {
    // 1x1, thin strips and Fashion-MNIST-like 28x28 sources, upscaled and downscaled.
    let aug = Augmenter::new(AugmentConfig::byol(32)).unwrap();
    let mut s = Scratch::new();
    for (w, h) in [(1u32, 1u32), (1, 50), (50, 1), (28, 28), (300, 7)] {
        let img = synth(w, h, 3);
        for i in 0..4 {
            run(&aug, &img, w, h, SampleKey::new(0, 0, i), &mut s);
        }
    }
}

#[test]
fn flip_twice_is_identity() {
    let (w, h) = (37usize, 11usize);
    let img = synth(w as u32, h as u32, 5);
    let mut f: Vec<f32> = img.iter().map(|&v| v as f32 / 255.0).collect();
    let orig = f.clone();
    hflip(&mut f, w, h, 3);
    assert_ne!(f, orig);
    hflip(&mut f, w, h, 3);
    assert_eq!(f, orig);
    let mut u = img.clone();
    hflip_rgb8(&mut u, w, h);
    assert_eq!(&u[0..3], &img[(w - 1) * 3..w * 3]);
    hflip_rgb8(&mut u, w, h);
    assert_eq!(u, img);
}

#[test]
fn solarize_identity_below_and_involution_above_threshold() {
    let xs: Vec<f32> = (0..=1000).map(|i| i as f32 / 1000.0).collect();
    let mut y = xs.clone();
    solarize(&mut y, 0.5);
    for (&x, &s) in xs.iter().zip(&y) {
        if x < 0.5 {
            assert_eq!(s, x);
        } else {
            assert_eq!(s, 1.0 - x);
            assert_eq!(1.0 - s, x, "x -> 1 - x is an involution");
        }
        assert!(s <= 0.5);
    }
}

#[test]
fn grayscale_channels_are_equal() {
    let img = synth(20, 10, 9);
    let n = 200;
    let mut chw: Vec<f32> = (0..3)
        .flat_map(|c| img.iter().skip(c).step_by(3).map(|&v| f32::from(v) / 255.0))
        .collect();
    grayscale(&mut chw, n);
    assert_eq!(chw[..n], chw[n..2 * n]);
    assert_eq!(chw[..n], chw[2 * n..]);
    let mut white = vec![1f32; 3];
    grayscale(&mut white, 1);
    assert!((white[0] - 0.9999).abs() < 1e-6, "weights sum to 0.9999");
}

#[test]
fn blur_preserves_a_constant_away_from_the_zero_padded_border() {
    let (w, h) = (96usize, 96usize);
    let c = [0.8f32, 0.47, 0.16];
    let mut img: Vec<f32> = c
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, w * h))
        .collect();
    let r = blur_radius(h, 10.0);
    assert_eq!(r, 4);
    let k = gaussian_kernel(1.7, r);
    gaussian_blur(&mut img, w, h, 3, &k, &mut BlurScratch::default());
    for (p, &cv) in c.iter().enumerate() {
        let plane = &img[p * w * h..(p + 1) * w * h];
        let mut sum = 0f64;
        for y in r..h - r {
            for x in r..w - r {
                let v = plane[y * w + x];
                assert!((v - cv).abs() < 1e-6, "interior ({x},{y}) {v} vs {cv}");
                sum += v as f64;
            }
        }
        let mean = sum / ((h - 2 * r) * (w - 2 * r)) as f64;
        assert!((mean - cv as f64).abs() < 1e-6);
        // Zero padding: the corner is c * (sum of half the kernel)^2.
        let half: f32 = k[r..].iter().sum();
        assert!((plane[0] - cv * half * half).abs() < 1e-6);
    }
    // One tap (under 20 px with divider 10) is the identity.
    assert_eq!(blur_radius(19, 10.0), 0);
}

#[test]
fn same_key_same_views_across_1_and_n_threads() {
    let aug = Augmenter::new(AugmentConfig::byol(64)).unwrap();
    let (w, h) = (120u32, 90u32);
    let imgs: Vec<Vec<u8>> = (0..6).map(|i| synth(w, h, i)).collect();
    let keys: Vec<SampleKey> = (0..48).map(|i| SampleKey::new(7, 3, i)).collect();
    let mut s = Scratch::new();
    let serial: Vec<[Vec<f32>; 2]> = keys
        .iter()
        .map(|k| run(&aug, &imgs[k.index as usize % 6], w, h, *k, &mut s))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let parallel: Vec<[Vec<f32>; 2]> = pool.install(|| {
        keys.par_iter()
            .rev()
            .map_init(Scratch::new, |s, k| {
                run(&aug, &imgs[k.index as usize % 6], w, h, *k, s)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    });
    assert!(serial == parallel, "outputs depend on threads or order");
    // Different sample, epoch or seed: different views.
    let a = run(&aug, &imgs[0], w, h, SampleKey::new(7, 3, 0), &mut s);
    for k in [
        SampleKey::new(7, 3, 6),
        SampleKey::new(7, 4, 0),
        SampleKey::new(8, 3, 0),
    ] {
        assert_ne!(a, run(&aug, &imgs[0], w, h, k, &mut s), "{k:?}");
    }
}

#[test]
fn draws_follow_the_view_specs() {
    let aug = Augmenter::new(AugmentConfig::byol(224)).unwrap();
    let n = 4000;
    let (mut flip, mut jit, mut gray, mut blur2, mut sol2) = (0, 0, 0, 0, 0);
    let mut orders = std::collections::HashSet::new();
    for i in 0..n {
        let [v1, v2] = aug.draw(SampleKey::new(1, 0, i), 256, 256);
        assert!(
            v1.blur_sigma.is_some_and(|s| (0.1..=2.0).contains(&s)),
            "T always blurs"
        );
        assert!(!v1.solarize, "T never solarizes");
        let area = (v1.crop.w * v1.crop.h) as f32 / 65536.0;
        assert!((0.07..=1.0).contains(&area), "area {area}");
        let c = v1.color;
        assert!(c.brightness_delta.unwrap().abs() <= 0.4);
        assert!((c.contrast_factor.unwrap() - 1.0).abs() <= 0.4);
        assert!((c.saturation_factor.unwrap() - 1.0).abs() <= 0.2);
        assert!(c.hue_delta.unwrap().abs() <= 0.1);
        orders.insert(c.order);
        flip += v1.flip as u32;
        jit += c.apply_jitter as u32;
        gray += c.apply_grayscale as u32;
        blur2 += v2.blur_sigma.is_some() as u32;
        sol2 += v2.solarize as u32;
    }
    let frac = |k: u32| k as f64 / n as f64;
    assert!((frac(flip) - 0.5).abs() < 0.04);
    assert!((frac(jit) - 0.8).abs() < 0.04);
    assert!((frac(gray) - 0.2).abs() < 0.04);
    assert!((frac(blur2) - 0.1).abs() < 0.03);
    assert!((frac(sol2) - 0.2).abs() < 0.04);
    assert_eq!(orders.len(), 24, "every jitter order occurs");
    // Small preset: never blurs.
    let small = Augmenter::new(AugmentConfig::small(32)).unwrap();
    for i in 0..200 {
        let [a, b] = small.draw(SampleKey::new(1, 0, i), 32, 32);
        assert!(a.blur_sigma.is_none() && b.blur_sigma.is_none());
    }
}

fn key_of(e: AugmentError) -> String {
    match e {
        AugmentError::InvalidConfig { key, .. } => key,
        other => panic!("not a config error: {other}"),
    }
}

#[test]
fn invalid_configs_name_the_key() {
    let bad = |f: &dyn Fn(&mut AugmentConfig)| {
        let mut c = AugmentConfig::byol(224);
        f(&mut c);
        key_of(Augmenter::new(c).unwrap_err())
    };
    assert_eq!(bad(&|c| c.size = 0), "size");
    assert_eq!(bad(&|c| c.view1.scale = [0.9, 0.5]), "view1.scale");
    assert_eq!(bad(&|c| c.view1.scale = [0.0, 0.5]), "view1.scale");
    assert_eq!(bad(&|c| c.view2.ratio = [2.0, 1.0]), "view2.ratio");
    assert_eq!(bad(&|c| c.view2.blur_p = 1.5), "view2.blur_p");
    assert_eq!(bad(&|c| c.view1.flip_p = -0.1), "view1.flip_p");
    assert_eq!(bad(&|c| c.view1.solarize_p = f32::NAN), "view1.solarize_p");
    assert_eq!(bad(&|c| c.view1.contrast = 1.5), "view1.contrast");
    assert_eq!(bad(&|c| c.view2.hue = 0.7), "view2.hue");
    assert_eq!(
        bad(&|c| c.view1.blur_sigma = [2.0, 0.1]),
        "view1.blur_sigma"
    );
    assert_eq!(bad(&|c| c.view1.blur_divider = 0.0), "view1.blur_divider");
    assert_eq!(bad(&|c| c.view2.std = [0.2, 0.0, 0.2]), "view2.std");
    let msg = Augmenter::new(AugmentConfig {
        size: 0,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains("`size`"), "{msg}");
}

#[test]
fn config_deserialises_with_per_view_defaults() {
    let c: AugmentConfig = serde_json::from_str(r#"{"view2": {"solarize_p": 0.3}}"#).unwrap();
    assert_eq!(
        c,
        AugmentConfig {
            view2: ViewSpec {
                solarize_p: 0.3,
                ..ViewSpec::byol_view2()
            },
            ..AugmentConfig::byol(224)
        }
    );
    assert_eq!(c.view2.blur_p, 0.1, "view2 keeps T' defaults");
    let c: AugmentConfig = serde_json::from_str(r#"{"preset": "small"}"#).unwrap();
    assert_eq!(c, AugmentConfig::small(32));
    let c: AugmentConfig =
        serde_json::from_str(r#"{"preset": "small", "size": 64, "view1": {"blur_p": 0.5}}"#)
            .unwrap();
    assert_eq!((c.size, c.view1.blur_p, c.view2.blur_p), (64, 0.5, 0.0));
    let c: AugmentConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, AugmentConfig::byol(224));
    // Round trip of a full config.
    let full = serde_json::to_string(&AugmentConfig::small(48)).unwrap();
    assert_eq!(
        serde_json::from_str::<AugmentConfig>(&full).unwrap(),
        AugmentConfig::small(48)
    );
    // Unknown keys are rejected, at both levels.
    let e = serde_json::from_str::<AugmentConfig>(r#"{"view1": {"blur_prob": 0.5}}"#).unwrap_err();
    assert!(e.to_string().contains("blur_prob"), "{e}");
    assert!(serde_json::from_str::<AugmentConfig>(r#"{"sise": 3}"#).is_err());
    assert!(serde_json::from_str::<ViewSpec>(r#"{"flip": 0.5}"#).is_err());
    let v: ViewSpec = serde_json::from_str(r#"{"interpolation": "bilinear"}"#).unwrap();
    assert_eq!(
        v,
        ViewSpec {
            interpolation: byol_augment::Interpolation::Bilinear,
            ..ViewSpec::byol_view1()
        }
    );
}

#[test]
fn fast_hsv_formulas_agree_with_the_official_ones() {
    use byol_augment::color_jitter::{
        hsv_to_rgb, hsv_to_rgb_fast, rgb_to_hsv, saturation, saturation_hue,
    };
    let steps = 24;
    let mut img = Vec::new();
    for r in 0..=steps {
        for g in 0..=steps {
            for b in 0..=steps {
                img.push([r, g, b].map(|v| v as f32 / steps as f32));
            }
        }
    }
    let mut worst = 0f32;
    for px in &img {
        let (h, s, v) = rgb_to_hsv(px[0], px[1], px[2]);
        let a = hsv_to_rgb(h, s, v);
        let b = hsv_to_rgb_fast(h, s, v);
        worst = worst
            .max((a.0 - b.0).abs())
            .max((a.1 - b.1).abs())
            .max((a.2 - b.2).abs());
    }
    assert!(worst < 1e-6, "hsv_to_rgb_fast off by {worst}");
    let n = img.len();
    let chw: Vec<f32> = (0..3).flat_map(|c| img.iter().map(move |p| p[c])).collect();
    for f in [0.0f32, 0.8, 1.0, 1.2, 3.0] {
        let (mut a, mut b) = (chw.clone(), chw.clone());
        saturation(&mut a, n, f);
        saturation_hue(&mut b, n, f, 0.0);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-6, "saturation factor {f}: shortcut off by {d}");
    }
}

/// The pipeline resizes on colour planes, fuses the flip into the load, saturation and hue
/// into one HSV round trip, and solarize, clip and normalisation into its last pass; it
/// must equal the op-by-op chain: crop + resize, then `postprocess` (flip, colour, blur,
/// solarize, clip), then normalise.
#[test]
fn the_fused_pipeline_equals_the_op_by_op_chain() {
    use byol_augment::crop::CropResizer;
    use byol_augment::postprocess;
    let (w, h) = (150u32, 120u32);
    let img = synth(w, h, 7);
    for size in [90u32, 64] {
        let aug = Augmenter::new(AugmentConfig::byol(size)).unwrap();
        let n = (size * size) as usize;
        let mut scratch = Scratch::new();
        let mut orders = std::collections::HashSet::new();
        for i in 0..48 {
            let key = SampleKey::new(3, 1, i);
            let views = run(&aug, &img, w, h, key, &mut scratch);
            for (v, params) in aug.draw(key, w, h).iter().enumerate() {
                let spec = aug.spec(v);
                orders.insert(params.color.order);
                let mut planes = vec![0u8; 3 * n];
                CropResizer::new()
                    .crop_resize_planar(
                        &img,
                        w,
                        h,
                        params.crop,
                        spec.interpolation,
                        byol_augment::crop::PlanesOut::U8(&mut planes),
                        size,
                        size,
                    )
                    .unwrap();
                let mut want: Vec<f32> = planes.iter().map(|&v| f32::from(v) / 255.0).collect();
                let s = size as usize;
                postprocess(&mut want, s, s, params, spec, &mut Scratch::new());
                for (c, plane) in want.chunks_exact_mut(n).enumerate() {
                    for x in plane {
                        *x = (*x - spec.mean[c]) / spec.std[c];
                    }
                }
                let worst = views[v]
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "size {size}, sample {i}, view {v}: off by {worst}"
                );
            }
        }
        assert!(orders.len() > 10, "the samples cover the jitter orders");
    }
}

/// The HSV steps clip less than the official code (saturation only from below, the fused
/// saturation + hue not at all): their formulas must stay in [0, 1] after rounding, at the
/// edges too (channels at 1, just below 1, at 0 and tiny).
#[test]
fn the_hsv_steps_stay_in_the_unit_range() {
    use byol_augment::color_jitter::{saturation, saturation_hue};
    let below_one = f32::from_bits(1f32.to_bits() - 1);
    let levels = [0.0, 1e-7, 0.1, 1.0 / 3.0, 0.5, 0.7, 0.999, below_one, 1.0];
    let mut px = Vec::new();
    for &r in &levels {
        for &g in &levels {
            for &b in &levels {
                px.push([r, g, b]);
            }
        }
    }
    let n = px.len();
    let chw: Vec<f32> = (0..3).flat_map(|c| px.iter().map(move |p| p[c])).collect();
    for sat in [0.0f32, 0.6, 1.0, 1.4, 8.0] {
        let mut img = chw.clone();
        saturation(&mut img, n, sat);
        for (j, &x) in img.iter().enumerate() {
            assert!(
                (0.0..=1.0).contains(&x),
                "sat {sat}: pixel {:?} gave {x}",
                px[j % n]
            );
        }
        for i in 0..=40 {
            let hue = -0.5 + i as f32 / 40.0;
            let mut img = chw.clone();
            saturation_hue(&mut img, n, sat, hue);
            for (j, &x) in img.iter().enumerate() {
                assert!(
                    (0.0..=1.0).contains(&x),
                    "sat {sat} hue {hue}: pixel {:?} gave {x}",
                    px[j % n]
                );
            }
        }
    }
}

/// Streaming (non-temporal) stores write the same values, at any alignment of the slot.
#[test]
fn streaming_output_equals_the_cached_write() {
    let aug = Augmenter::new(AugmentConfig::byol(30)).unwrap();
    let img = synth(50, 40, 3);
    let len = aug.view_len();
    let mut s = Scratch::new();
    for i in 0..12u64 {
        let key = SampleKey::new(5, 0, i);
        let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
        aug.two_views(
            &img,
            50,
            40,
            key,
            &mut s,
            [ViewOut::f32(&mut a), ViewOut::f32(&mut b)],
        )
        .unwrap();
        // Offsets 0..3 floats: every 16-byte alignment of the slot's start.
        let offset = i as usize % 4;
        let (mut sa, mut sb) = (vec![0f32; len + 4], vec![0f32; len + 4]);
        let slots = [
            ViewOut::f32(&mut sa[offset..offset + len]).streaming(),
            ViewOut::f32(&mut sb[offset..offset + len]).streaming(),
        ];
        aug.two_views(&img, 50, 40, key, &mut s, slots).unwrap();
        assert_eq!(a, sa[offset..offset + len], "sample {i}, view 1");
        assert_eq!(b, sb[offset..offset + len], "sample {i}, view 2");
    }
}
