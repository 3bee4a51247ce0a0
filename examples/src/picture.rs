//! PNG pictures: a grid of image panels (rows of original | masked | reconstruction |
//! reconstruction + visible), scaled up with whole-pixel blocks so small images stay sharp.

use crate::checkpoint::write_atomic;
use crate::reconstruct::Panels;
use std::io;
use std::path::Path;

/// An 8-bit RGB picture.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes, row-major.
    pub data: Vec<u8>,
}

/// Space between panels, in pixels.
const GAP: usize = 4;

/// Lays out `panels` as one row per image and one column per panel, each panel scaled by the
/// smallest whole factor that makes it at least `min_cell` pixels wide.
pub fn grid(p: &Panels, min_cell: usize) -> Rgb {
    let scale = min_cell.div_ceil(p.size).max(1);
    let cell = p.size * scale;
    let columns = [&p.original, &p.masked, &p.reconstruction, &p.pasted];
    let width = columns.len() * (cell + GAP) + GAP;
    let height = p.n * (cell + GAP) + GAP;
    let mut data = vec![255u8; width * height * 3];
    let plane = p.size * p.size;
    for i in 0..p.n {
        for (col, img) in columns.iter().enumerate() {
            let (x0, y0) = (GAP + col * (cell + GAP), GAP + i * (cell + GAP));
            for y in 0..cell {
                for x in 0..cell {
                    let src = (y / scale) * p.size + x / scale;
                    let dst = ((y0 + y) * width + x0 + x) * 3;
                    for ch in 0..3 {
                        // A single-channel image is shown as gray.
                        let c = ch.min(p.channels - 1);
                        let v = img[(i * p.channels + c) * plane + src];
                        data[dst + ch] = (v * 255.0).round() as u8;
                    }
                }
            }
        }
    }
    Rgb {
        width,
        height,
        data,
    }
}

/// Encodes `img` as PNG with a `Description` text chunk.
pub fn encode_png(img: &Rgb, description: &str) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.add_text_chunk("Description".to_string(), description.to_string())
        .map_err(io::Error::other)?;
    let mut w = enc.write_header().map_err(io::Error::other)?;
    w.write_image_data(&img.data).map_err(io::Error::other)?;
    w.finish().map_err(io::Error::other)?;
    Ok(out)
}

/// What the columns of a reconstruction grid show, for the PNG's description and the console.
pub fn describe(p: &Panels) -> String {
    let mut s = format!(
        "columns: original | masked ({:.0} % of patches removed) | reconstruction | \
         reconstruction with the visible patches pasted back; masked-patch loss {:.4}",
        p.mask_ratio * 100.0,
        p.loss
    );
    if p.used_true_patch_stats {
        s.push_str(
            "; norm-pix model: each predicted patch was un-normalized with the true patch's mean \
             and variance",
        );
    }
    s
}

/// Writes the reconstruction grid of `p` to `path` (atomically) and returns its description.
pub fn save_grid(p: &Panels, path: &Path) -> io::Result<String> {
    let text = describe(p);
    write_atomic(path, &encode_png(&grid(p, 96), &text)?)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_scaled_panels_and_decodes_as_png() {
        // Two 2x2 gray images; panel k of image i has the constant value (4 i + k) / 8.
        let panel = |k: usize| -> Vec<f32> {
            (0..2)
                .flat_map(|i| std::iter::repeat_n((4 * i + k) as f32 / 8.0, 4))
                .collect()
        };
        let p = Panels {
            n: 2,
            channels: 1,
            size: 2,
            original: panel(0),
            masked: panel(1),
            reconstruction: panel(2),
            pasted: panel(3),
            mask_ratio: 0.75,
            used_true_patch_stats: true,
            loss: 0.5,
        };
        let img = grid(&p, 5); // scale 3: cells of 6 pixels
        assert_eq!((img.width, img.height), (4 * 10 + 4, 2 * 10 + 4));
        let px = |x: usize, y: usize| img.data[(y * img.width + x) * 3];
        assert_eq!(px(0, 0), 255, "gap");
        // Row 1, column 2 starts at (4 + 2 * 10, 4 + 10).
        assert_eq!(px(24, 14), ((6.0f32 / 8.0) * 255.0).round() as u8);
        assert_eq!(px(29, 19), ((6.0f32 / 8.0) * 255.0).round() as u8);

        let bytes = encode_png(&img, &describe(&p)).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (44, 24));
        let text = &info.uncompressed_latin1_text[0].text;
        assert!(text.contains("true patch's mean and variance"), "{text}");
    }
}
