//! A small labelled image set generated from a seed: four texture classes (horizontal
//! stripes, vertical stripes, checkerboard, dots) at a random period (2 to 8 px), phase
//! and polarity, in a random bright and a random dark gray. Random crops, flips and
//! colour jitter keep every class's texture, so the class is what two views of an
//! image share: BYOL learns it, a random encoder does not see it.
//!
//! Used by the demo and (through `#[path]`) by `tests/learning.rs`.

/// Class names, in class-index order.
pub const CLASSES: [&str; 4] = ["horizontal", "vertical", "checker", "dots"];

/// Side of every image in pixels.
pub const SIDE: u32 = 24;

/// SplitMix64: a seeded stream of draws for the generator.
pub struct Draws(pub u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

/// Writes `per_class` textures of every class, drawn from `seed`, as an ImageFolder:
/// `dir/<class>/NNN.png` (the demo's held-out set is seed 2, 64 per class; the learning
/// test's training set seed 1, 128 per class).
pub fn write_image_folder(
    dir: &std::path::Path,
    per_class: u32,
    seed: u64,
) -> image::ImageResult<()> {
    let mut d = Draws(seed);
    for (c, class) in CLASSES.iter().enumerate() {
        std::fs::create_dir_all(dir.join(class))?;
        for i in 0..per_class {
            texture(c, &mut d).save(dir.join(class).join(format!("{i:03}.png")))?;
        }
    }
    Ok(())
}

/// One `SIDE` x `SIDE` texture of class `class` (an index into [`CLASSES`]).
pub fn texture(class: usize, d: &mut Draws) -> image::RgbImage {
    let half = 1 + d.below(4); // stripes 1-4 px wide
    let period = 2 * half;
    let (px, py) = (d.below(period), d.below(period));
    let bright = [140 + d.below(116) as u8; 3];
    let dark = [d.below(110) as u8; 3];
    let (on, off) = if d.below(2) == 0 {
        (bright, dark)
    } else {
        (dark, bright)
    };
    image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let (bx, by) = (
            ((x + px) / half).is_multiple_of(2),
            ((y + py) / half).is_multiple_of(2),
        );
        let lit = match class {
            0 => by,
            1 => bx,
            2 => bx != by,
            _ => bx && by,
        };
        image::Rgb(if lit { on } else { off })
    })
}
