//! The dataset's fixed settings: resolved from a run's overrides, and merged with the
//! ones a dataset was created with (a conflict is an error naming the key).

use super::*;

pub(super) fn resolve_settings(o: &SettingsOverride) -> IngestSettings {
    let d = IngestSettings::default();
    IngestSettings {
        codec: o.codec.unwrap_or(d.codec),
        max_side: o.max_side.map_or(d.max_side, |s| (s > 0).then_some(s)),
        compression: o.compression.unwrap_or(d.compression),
        zstd_level: o.zstd_level.unwrap_or(d.zstd_level),
        jpeg_quality: o.jpeg_quality.unwrap_or(d.jpeg_quality),
    }
}

pub(super) fn merge_settings(
    out: &Path,
    mut m: Manifest,
    o: &SettingsOverride,
) -> Result<Manifest, IngestError> {
    let conflict = |key, existing: String, requested: String| IngestError::SettingsConflict {
        path: out.to_owned(),
        key,
        existing,
        requested,
    };
    if let Some(c) = o.codec
        && c != m.settings.codec
    {
        return Err(conflict(
            "codec",
            m.settings.codec.to_string(),
            c.to_string(),
        ));
    }
    if let Some(s) = o.max_side {
        let requested = (s > 0).then_some(s);
        if requested != m.settings.max_side {
            let show = |v: Option<u32>| v.map_or("none".into(), |v| v.to_string());
            return Err(conflict(
                "max-side",
                show(m.settings.max_side),
                show(requested),
            ));
        }
    }
    // Compression, level and quality only affect how new records are written (each
    // shard records its compression): they may change from run to run.
    if let Some(c) = o.compression {
        m.settings.compression = c;
    }
    if let Some(l) = o.zstd_level {
        m.settings.zstd_level = l;
    }
    if let Some(q) = o.jpeg_quality {
        m.settings.jpeg_quality = q;
    }
    Ok(m)
}
