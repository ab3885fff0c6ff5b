//! Every case of ../../shared/fixtures/augment (see its README), matched within its tolerance.

use std::path::{Path, PathBuf};

use byol_augment::blur::{
    BlurScratch, blur_radius, gaussian_blur, gaussian_kernel, trimmed_radius,
};
use byol_augment::color_jitter::{brightness, color_transform, contrast, hue, saturation};
use byol_augment::crop::{CropDraws, CropResizer, center_crop_box, random_crop_box};
use byol_augment::grayscale::grayscale;
use byol_augment::layout::{chw_to_hwc, hwc_to_chw};
use byol_augment::normalize::clip;
use byol_augment::solarize::solarize;
use byol_augment::{
    ColorParams, CropBox, Interpolation, Scratch, ViewParams, ViewSpec, flip::hflip, postprocess,
};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/augment"
    ))
}

fn read_f32(p: &Path) -> Vec<f32> {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn read_png(p: &Path) -> (Vec<u8>, u32, u32) {
    let img = image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w, h)
}

/// The case's input as f32 HWC.
fn input_f32(case: &Value) -> Vec<f32> {
    let file = dir().join(case["input"].as_str().unwrap());
    if file.extension().unwrap() == "f32" {
        read_f32(&file)
    } else {
        read_png(&file)
            .0
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect()
    }
}

fn f(v: &Value) -> f32 {
    v.as_f64().unwrap() as f32
}

fn color_params(p: &Value) -> ColorParams {
    let order: Vec<u8> = p["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    ColorParams {
        order: order.try_into().unwrap(),
        brightness_delta: Some(f(&p["brightness_delta"])),
        contrast_factor: Some(f(&p["contrast_factor"])),
        saturation_factor: Some(f(&p["saturation_factor"])),
        hue_delta: Some(f(&p["hue_delta"])),
        apply_jitter: p["apply_jitter"].as_bool().unwrap(),
        apply_grayscale: p["apply_grayscale"].as_bool().unwrap(),
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_png(id: &str, case: &Value, actual_hwc: &[f32]) {
    let (png, _, _) = read_png(&dir().join(case["expected_png"].as_str().unwrap()));
    let tol = case["tol_png_u8"].as_i64().unwrap();
    for (i, (&a, &e)) in actual_hwc.iter().zip(&png).enumerate() {
        let u = (a.clamp(0.0, 1.0) as f64 * 255.0).round_ties_even() as i64;
        assert!(
            (u - e as i64).abs() <= tol,
            "{id}: png element {i}: {u} vs {e}"
        );
    }
}

/// Runs an image op on the case input in planar layout and returns HWC output.
fn run_image_op(case: &Value) -> Vec<f32> {
    let op = case["op"].as_str().unwrap();
    let p = &case["params"];
    let shape: Vec<usize> = case["shape_hwc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (h, w) = (shape[0], shape[1]);
    let n = h * w;
    let hwc = input_f32(case);
    let mut img = vec![0f32; 3 * n];
    hwc_to_chw(&hwc, n, &mut img);
    match op {
        "brightness" => brightness(&mut img, f(&p["delta"])),
        "contrast" => contrast(&mut img, n, f(&p["factor"])),
        "saturation" => saturation(&mut img, n, f(&p["factor"])),
        "hue" => hue(&mut img, n, f(&p["delta"])),
        "grayscale" => grayscale(&mut img, n),
        "color_jitter" => color_transform(&mut img, n, &color_params(p)),
        "gaussian_blur" => {
            let radius = blur_radius(h, f(&p["blur_divider"]));
            assert_eq!(radius as u64, p["radius"].as_u64().unwrap(), "radius");
            let k = gaussian_kernel(f(&p["sigma"]), radius);
            let want: Vec<f32> = p["kernel"].as_array().unwrap().iter().map(f).collect();
            assert!(max_abs(&k, &want) < 1e-6, "kernel {k:?} vs {want:?}");
            let keep = trimmed_radius(&k);
            gaussian_blur(
                &mut img,
                w,
                h,
                3,
                &k[radius - keep..=radius + keep],
                &mut BlurScratch::default(),
            );
        }
        "solarize" => solarize(&mut img, f(&p["threshold"])),
        "hflip" => hflip(&mut img, w, h, 3),
        "clip" => clip(&mut img),
        "pipeline" => {
            let mut spec = ViewSpec::byol_view1();
            let blur = &p["blur"];
            if !blur.is_null() {
                spec.blur_divider = f(&blur["blur_divider"]);
            }
            let params = ViewParams {
                crop: CropBox::default(),
                flip: p["flip"].as_bool().unwrap(),
                color: color_params(&p["color"]),
                blur_sigma: (!blur.is_null()).then(|| f(&blur["sigma"])),
                solarize: p["solarize_on"].as_bool().unwrap(),
            };
            postprocess(&mut img, w, h, &params, &spec, &mut Scratch::new());
        }
        other => panic!("unknown op {other}"),
    }
    let mut out = vec![0f32; 3 * n];
    chw_to_hwc(&img, n, &mut out);
    out
}

fn box_of(v: &Value) -> CropBox {
    let g = |k: &str| v[k].as_u64().unwrap() as u32;
    CropBox {
        offset_h: g("offset_h"),
        offset_w: g("offset_w"),
        h: g("h"),
        w: g("w"),
    }
}

#[test]
fn every_fixture_case_matches() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 54, "only {} cases", cases.len());
    let mut report = Vec::new();
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let p = &case["params"];
        match case["op"].as_str().unwrap() {
            "random_crop_box" => {
                let d = CropDraws {
                    u_area: f(&p["u_area"]),
                    u_log_ratio: f(&p["u_log_ratio"]),
                    u_offset_w: f(&p["u_offset_w"]),
                    u_offset_h: f(&p["u_offset_h"]),
                };
                let ar: Vec<f32> = p["area_range"].as_array().unwrap().iter().map(f).collect();
                let rr: Vec<f32> = p["aspect_ratio_range"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(f)
                    .collect();
                let b = random_crop_box(
                    p["image_height"].as_u64().unwrap() as u32,
                    p["image_width"].as_u64().unwrap() as u32,
                    [ar[0], ar[1]],
                    [rr[0], rr[1]],
                    d,
                );
                assert_eq!(b, box_of(&case["expected_box"]), "{id}");
            }
            "center_crop_box" => {
                let b = center_crop_box(
                    p["image_height"].as_u64().unwrap() as u32,
                    p["image_width"].as_u64().unwrap() as u32,
                    p["image_size"].as_u64().unwrap() as u32,
                    p["crop_padding"].as_u64().unwrap() as u32,
                );
                assert_eq!(b, box_of(&case["expected_box"]), "{id}");
            }
            "crop_resize" => {
                let (src, w, h) = read_png(&dir().join(case["input"].as_str().unwrap()));
                let (oh, ow) = (
                    p["out_height"].as_u64().unwrap() as u32,
                    p["out_width"].as_u64().unwrap() as u32,
                );
                let mut dst = vec![0u8; (oh * ow * 3) as usize];
                CropResizer::new()
                    .crop_resize(
                        &src,
                        w,
                        h,
                        box_of(&p["box"]),
                        Interpolation::Bicubic,
                        &mut dst,
                        ow,
                        oh,
                    )
                    .unwrap();
                let actual: Vec<f32> = dst.iter().map(|&v| v as f32 / 255.0).collect();
                let pil = read_f32(&dir().join(case["expected_f32"].as_str().unwrap()));
                let tf = read_f32(&dir().join(case["expected_tf_f32"].as_str().unwrap()));
                let (d, dtf) = (max_abs(&actual, &pil), max_abs(&actual, &tf));
                let tol = f(&case["tol_max_abs"]);
                report.push(format!(
                    "{id}: vs pillow {d:.5} (tol {tol:.5}), vs tf {dtf:.5}"
                ));
                assert!(d <= tol, "{id}: max abs {d} > {tol} vs Pillow");
                check_png(id, case, &actual);
            }
            _ => {
                let actual = run_image_op(case);
                let expected = read_f32(&dir().join(case["expected_f32"].as_str().unwrap()));
                let d = max_abs(&actual, &expected);
                let tol = f(&case["tol_max_abs"]);
                report.push(format!("{id}: {d:.2e} (tol {tol:.0e})"));
                assert!(d <= tol, "{id}: max abs {d} > {tol}");
                check_png(id, case, &actual);
            }
        }
    }
    println!("{}", report.join("\n"));
}
