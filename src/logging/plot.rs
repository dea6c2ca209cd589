//! What the plots of a run (`sweep.png`, `channel_use.png`) share.

use std::path::PathBuf;

use plotters::style::FontStyle;

/// Registers a system sans-serif font for the plot's text (plotters' `ab_glyph` backend needs
/// font bytes; none is bundled). `RLPRUNE_FONT` names a TTF/OTF file to use instead. Without
/// any, the plot is drawn without text.
pub fn register_font() -> bool {
    use std::sync::OnceLock;
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let candidates = std::env::var("RLPRUNE_FONT").ok().into_iter().map(PathBuf::from).chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/System/Library/Fonts/Supplemental/Arial.ttf",
                "C:\\Windows\\Fonts\\arial.ttf",
            ]
            .iter()
            .map(PathBuf::from),
        );
        for p in candidates {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no font found for the plot (set RLPRUNE_FONT to a .ttf); drawing it without text");
        false
    })
}
