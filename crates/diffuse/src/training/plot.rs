//! What a person watches: the loss curve drawn as a PNG (axes, the raw loss in light blue, a
//! smoothed loss in dark blue, tick labels in a 3×5 bitmap font) and sample images tiled
//! into a grid.

use image::{Rgb, RgbImage};

use super::Image8;

/// 3×5 glyphs, one row per `u8` (bit 2 = left column), for what tick labels need.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        'e' => [0b000, 0b111, 0b111, 0b100, 0b111],
        'k' => [0b100, 0b101, 0b110, 0b101, 0b101],
        _ => return None,
    })
}

/// Text scale: each font pixel is a `SCALE`×`SCALE` block.
const SCALE: u32 = 2;

fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * 4 * SCALE
}

fn draw_text(image: &mut RgbImage, x: i64, y: i64, text: &str, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        for (row, bits) in rows.iter().enumerate() {
            for column in 0..3 {
                if bits & (0b100 >> column) != 0 {
                    for dy in 0..SCALE as i64 {
                        for dx in 0..SCALE as i64 {
                            let px = x + (i as i64 * 4 + column) * SCALE as i64 + dx;
                            let py = y + row as i64 * SCALE as i64 + dy;
                            put(image, px, py, color);
                        }
                    }
                }
            }
        }
    }
}

fn put(image: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < image.width() && (y as u32) < image.height() {
        image.put_pixel(x as u32, y as u32, color);
    }
}

/// A line from (x0, y0) to (x1, y1), one pixel wide (Bresenham).
fn draw_line(image: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut error) = (x0, y0, dx + dy);
    loop {
        put(image, x, y, color);
        if x == x1 && y == y1 {
            break;
        }
        let doubled = 2 * error;
        if doubled >= dy {
            error += dy;
            x += sx;
        }
        if doubled <= dx {
            error += dx;
            y += sy;
        }
    }
}

/// A tick label: up to 4 significant digits, without exponent for moderate values.
fn format_value(value: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    let magnitude = value.abs().log10().floor() as i32;
    if (-3..5).contains(&magnitude) {
        let decimals = (3 - magnitude).clamp(0, 6) as usize;
        let text = format!("{value:.decimals$}");
        if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_string() } else { text }
    } else {
        format!("{value:.2e}")
    }
}

fn format_step(step: u64) -> String {
    if step >= 10_000 && step.is_multiple_of(1000) { format!("{}k", step / 1000) } else { step.to_string() }
}

/// The loss per step as a `width`×`height` chart: the x axis from the first to the last step,
/// the y axis logarithmic when all losses are positive (diffusion losses fall over decades),
/// the raw values and an exponential moving average (factor 0.9) of them.
pub fn loss_chart(losses: &[(u64, f32)], width: u32, height: u32) -> RgbImage {
    let mut image = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let points: Vec<(u64, f64)> = losses.iter().filter(|(_, l)| l.is_finite()).map(|&(s, l)| (s, l as f64)).collect();
    let (left, right, top, bottom) = (70i64, width as i64 - 20, 20i64, height as i64 - 40);
    let axis = Rgb([0, 0, 0]);
    draw_line(&mut image, (left, top), (left, bottom), axis);
    draw_line(&mut image, (left, bottom), (right, bottom), axis);
    if points.is_empty() || right <= left || bottom <= top {
        return image;
    }
    let logarithmic = points.iter().all(|&(_, l)| l > 0.0);
    let transform = |l: f64| if logarithmic { l.log10() } else { l };
    let (first_step, last_step) = (points[0].0, points[points.len() - 1].0.max(points[0].0 + 1));
    let (mut low, mut high) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| (lo.min(transform(l)), hi.max(transform(l))));
    if high - low < 1e-9 {
        low -= 0.5;
        high += 0.5;
    }
    let to_x = |step: u64| left + ((step - first_step) as f64 / (last_step - first_step) as f64 * (right - left) as f64).round() as i64;
    let to_y = |l: f64| bottom - ((transform(l) - low) / (high - low) * (bottom - top) as f64).round() as i64;

    // Ticks and labels: three on each axis.
    let label_color = Rgb([60, 60, 60]);
    let grid = Rgb([225, 225, 225]);
    for i in 0..3 {
        let fraction = i as f64 / 2.0;
        let level = low + fraction * (high - low);
        let value = if logarithmic { 10f64.powf(level) } else { level };
        let y = bottom - (fraction * (bottom - top) as f64).round() as i64;
        if i > 0 {
            draw_line(&mut image, (left + 1, y), (right, y), grid);
        }
        draw_line(&mut image, (left - 4, y), (left, y), axis);
        let text = format_value(value);
        draw_text(&mut image, left - 8 - text_width(&text) as i64, y - 5, &text, label_color);
        let step = first_step + ((last_step - first_step) as f64 * fraction).round() as u64;
        let x = to_x(step);
        draw_line(&mut image, (x, bottom), (x, bottom + 4), axis);
        let text = format_step(step);
        draw_text(&mut image, x - text_width(&text) as i64 / 2, bottom + 10, &text, label_color);
    }

    let mut draw_series = |values: &[(u64, f64)], color: Rgb<u8>| {
        for pair in values.windows(2) {
            draw_line(&mut image, (to_x(pair[0].0), to_y(pair[0].1)), (to_x(pair[1].0), to_y(pair[1].1)), color);
        }
        if values.len() == 1 {
            put(&mut image, to_x(values[0].0), to_y(values[0].1), color);
        }
    };
    draw_series(&points, Rgb([170, 200, 240]));
    let mut smoothed = Vec::with_capacity(points.len());
    let mut average = points[0].1;
    for &(step, loss) in &points {
        average = 0.9 * average + 0.1 * loss;
        smoothed.push((step, average));
    }
    draw_series(&smoothed, Rgb([20, 60, 170]));
    image
}

/// Images (each `(width, height, channels, bytes)`, all the same size) tiled in rows of
/// `columns`, 2 pixels apart on a black background.
pub fn tile(images: &[Image8], columns: usize) -> Option<Image8> {
    let &(width, height, channels, _) = images.first()?;
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let gap = 2;
    let (grid_width, grid_height) = (columns * width + (columns + 1) * gap, rows * height + (rows + 1) * gap);
    let mut pixels = vec![0u8; grid_width * grid_height * channels];
    for (index, (w, h, c, bytes)) in images.iter().enumerate() {
        if (*w, *h, *c) != (width, height, channels) {
            return None;
        }
        let (x0, y0) = (gap + (index % columns) * (width + gap), gap + (index / columns) * (height + gap));
        for y in 0..height {
            let destination = ((y0 + y) * grid_width + x0) * channels;
            pixels[destination..destination + width * channels].copy_from_slice(&bytes[y * width * channels..(y + 1) * width * channels]);
        }
    }
    Some((grid_width, grid_height, channels, pixels))
}
