//! The format of a recording, from its first bytes (the extension is not trusted).
//!
//! Asterisk writes `wav` (RIFF PCM), `WAV` (the "wav49" format: RIFF with GSM 6.10 frames,
//! format tag 0x0031), `gsm` (raw 33-byte GSM 6.10 frames), `ogg`/`opus` and, through an
//! encoder, mp3. Anything else is served as `application/octet-stream`.

use std::io::Read;
use std::path::Path;

/// How many leading bytes [`sniff`] looks at.
pub const SNIFF_LEN: usize = 512;

/// GSM 6.10 frame size and the signature nibble every frame starts with.
const GSM_FRAME: usize = 33;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mp3,
    /// RIFF/WAVE with PCM (or any codec other than GSM 6.10).
    Wav,
    /// RIFF/WAVE with GSM 6.10 frames: Asterisk's `wav49` (`.WAV`).
    Wav49,
    Ogg,
    Opus,
    /// Raw GSM 6.10 frames.
    Gsm,
    Unknown,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Mp3 => "audio/mpeg",
            Format::Wav => "audio/wav",
            Format::Wav49 => "audio/x-wav",
            Format::Ogg | Format::Opus => "audio/ogg",
            Format::Gsm => "audio/x-gsm",
            Format::Unknown => "application/octet-stream",
        }
    }

    /// The extension used in links and download names.
    pub fn ext(self) -> &'static str {
        match self {
            Format::Mp3 => "mp3",
            Format::Wav | Format::Wav49 => "wav",
            Format::Ogg => "ogg",
            Format::Opus => "opus",
            Format::Gsm => "gsm",
            Format::Unknown => "bin",
        }
    }
}

/// The format of a file whose first bytes are `head` and whole length is `len`.
pub fn sniff(head: &[u8], len: u64) -> Format {
    if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WAVE" {
        return match wave_format_tag(head) {
            Some(0x0031) => Format::Wav49,
            _ => Format::Wav,
        };
    }
    if head.starts_with(b"OggS") {
        // The first page's first packet names the codec.
        return if head.len() >= 36 && &head[28..36] == b"OpusHead" {
            Format::Opus
        } else {
            Format::Ogg
        };
    }
    if head.len() >= 10 && head.starts_with(b"ID3") && head[3] < 0xff && head[4] < 0xff {
        return Format::Mp3;
    }
    if is_mpeg_audio_frame(head) {
        return Format::Mp3;
    }
    if is_gsm(head, len) {
        return Format::Gsm;
    }
    Format::Unknown
}

/// Reads the first bytes of `path` and sniffs them.
pub fn sniff_file(path: &Path) -> std::io::Result<Format> {
    let mut file = super::open_regular(path)?;
    let len = file.metadata()?.len();
    let mut head = Vec::with_capacity(SNIFF_LEN);
    (&mut file).take(SNIFF_LEN as u64).read_to_end(&mut head)?;
    Ok(sniff(&head, len))
}

/// Whether a recording holds any sound: a RIFF/WAVE file needs a non-empty `data` chunk
/// (MixMonitor leaves a 44-byte header when nobody was bridged), other formats any bytes.
pub fn holds_audio(path: &Path) -> bool {
    let Ok(mut file) = super::open_regular(path) else {
        return false;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut head = Vec::with_capacity(SNIFF_LEN);
    if (&mut file)
        .take(SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .is_err()
    {
        return false;
    }
    match sniff(&head, len) {
        Format::Wav | Format::Wav49 => {
            wave_data_offset(&head).is_some_and(|(at, size)| size > 0 && len > at as u64)
        }
        Format::Gsm => len > 0,
        _ => len > 0,
    }
}

/// Where the `data` chunk's bytes start, and its declared size.
fn wave_data_offset(head: &[u8]) -> Option<(usize, u32)> {
    let mut at = 12;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size = u32::from_le_bytes(head[at + 4..at + 8].try_into().ok()?);
        if id == b"data" {
            return Some((at + 8, size));
        }
        let size = usize::try_from(size).ok()?;
        at = at
            .checked_add(8)?
            .checked_add(size.checked_add(size & 1)?)?;
    }
    None
}

/// The `fmt ` chunk's format tag, walking the RIFF chunks within `head`.
fn wave_format_tag(head: &[u8]) -> Option<u16> {
    let mut at = 12;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size =
            usize::try_from(u32::from_le_bytes(head[at + 4..at + 8].try_into().ok()?)).ok()?;
        if id == b"fmt " {
            let tag = head.get(at + 8..at + 10)?;
            return Some(u16::from_le_bytes([tag[0], tag[1]]));
        }
        // Chunks are padded to an even size.
        at = at
            .checked_add(8)?
            .checked_add(size.checked_add(size & 1)?)?;
    }
    None
}

/// An MPEG audio frame header (layers I–III, any version): 11 sync bits, no reserved values.
fn is_mpeg_audio_frame(head: &[u8]) -> bool {
    if head.len() < 4 || head[0] != 0xff || head[1] & 0xe0 != 0xe0 {
        return false;
    }
    let version = (head[1] >> 3) & 0b11;
    let layer = (head[1] >> 1) & 0b11;
    let bitrate = head[2] >> 4;
    let sample_rate = (head[2] >> 2) & 0b11;
    // version 01 and layer 00 are reserved (layer 00 is also how AAC's ADTS header looks).
    version != 0b01 && layer != 0b00 && bitrate != 0b1111 && sample_rate != 0b11
}

/// Raw GSM 6.10: whole 33-byte frames, each starting with the 0xD signature nibble.
fn is_gsm(head: &[u8], len: u64) -> bool {
    if len == 0 || len % GSM_FRAME as u64 != 0 {
        return false;
    }
    let starts: Vec<u8> = head.iter().step_by(GSM_FRAME).take(8).copied().collect();
    !starts.is_empty() && starts.iter().all(|b| b >> 4 == 0xd)
}

#[cfg(test)]
pub(crate) mod samples {
    //! Small headers of each format, shared with the tests of the other parts of the module.

    /// A RIFF/WAVE header with `format_tag` and `data_len` bytes of data declared.
    pub fn wav_header(format_tag: u16, data_len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&(36 + data_len).to_le_bytes());
        h.extend_from_slice(b"WAVE");
        h.extend_from_slice(b"fmt ");
        h.extend_from_slice(&16u32.to_le_bytes());
        h.extend_from_slice(&format_tag.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes()); // mono
        h.extend_from_slice(&8000u32.to_le_bytes());
        h.extend_from_slice(&16000u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(b"data");
        h.extend_from_slice(&data_len.to_le_bytes());
        h
    }

    /// An MPEG-1 layer III frame header: 128 kbit/s, 44.1 kHz.
    pub const MP3_FRAME: [u8; 4] = [0xff, 0xfb, 0x90, 0x64];
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;

    #[test]
    fn wav_pcm_and_wav49_by_the_format_tag() {
        assert_eq!(sniff(&wav_header(1, 0), 44), Format::Wav);
        assert_eq!(sniff(&wav_header(0xfffe, 0), 44), Format::Wav);
        assert_eq!(sniff(&wav_header(0x31, 0), 44), Format::Wav49);
        // A LIST chunk before `fmt ` is walked over.
        let mut h = b"RIFF\0\0\0\0WAVELIST\x03\0\0\0abc\0".to_vec();
        h.extend_from_slice(&wav_header(0x31, 0)[12..]);
        assert_eq!(sniff(&h, h.len() as u64), Format::Wav49);
        // RIFF but not WAVE (an AVI) is not audio we know.
        assert_eq!(sniff(b"RIFF\0\0\0\0AVI LIST", 16), Format::Unknown);
    }

    #[test]
    fn mp3_by_id3_tag_or_frame_header() {
        assert_eq!(sniff(b"ID3\x04\0\0\0\0\0\x21rest", 100), Format::Mp3);
        assert_eq!(sniff(&MP3_FRAME, 417), Format::Mp3);
        // MPEG-2 layer III, and MPEG-2.5 layer III at 8 kHz (what lame makes of a telephony WAV).
        assert_eq!(sniff(&[0xff, 0xf3, 0x48, 0xc4], 100), Format::Mp3);
        assert_eq!(sniff(&[0xff, 0xe3, 0x18, 0xc4], 100), Format::Mp3);
        // AAC ADTS (layer 00), a reserved bitrate, a reserved sample rate: not mp3.
        assert_eq!(sniff(&[0xff, 0xf1, 0x50, 0x80], 100), Format::Unknown);
        assert_eq!(sniff(&[0xff, 0xfb, 0xf0, 0x64], 100), Format::Unknown);
        assert_eq!(sniff(&[0xff, 0xfb, 0x9c, 0x64], 100), Format::Unknown);
    }

    #[test]
    fn ogg_and_opus_by_the_first_packet() {
        let mut page = b"OggS\0\x02".to_vec();
        page.resize(28, 0);
        let mut opus = page.clone();
        opus.extend_from_slice(b"OpusHead\x01\x01");
        assert_eq!(sniff(&opus, 100), Format::Opus);
        let mut vorbis = page;
        vorbis.extend_from_slice(b"\x01vorbis\0\0\0");
        assert_eq!(sniff(&vorbis, 100), Format::Ogg);
    }

    #[test]
    fn raw_gsm_frames() {
        let mut frames = vec![0u8; 33 * 3];
        for f in 0..3 {
            frames[f * 33] = 0xd8;
        }
        assert_eq!(sniff(&frames, 99), Format::Gsm);
        assert_eq!(sniff(&frames, 100), Format::Unknown, "not whole frames");
        frames[33] = 0x12;
        assert_eq!(
            sniff(&frames, 99),
            Format::Unknown,
            "a frame without the signature"
        );
    }

    #[test]
    fn a_chunk_size_at_the_limit_ends_the_walk() {
        // The largest size a chunk can declare: the walk stops (no overflow, even where usize
        // has 32 bits) and the file is plain WAV, not wav49.
        let mut h = b"RIFF\0\0\0\0WAVELIST\xff\xff\xff\xff".to_vec();
        h.extend_from_slice(&wav_header(0x31, 0)[12..]);
        assert_eq!(wave_format_tag(&h), None);
        assert_eq!(sniff(&h, h.len() as u64), Format::Wav);
    }

    #[test]
    fn text_or_empty_is_unknown_whatever_the_name() {
        assert_eq!(sniff(b"<html>", 6), Format::Unknown);
        assert_eq!(sniff(b"", 0), Format::Unknown);
        assert_eq!(Format::Unknown.content_type(), "application/octet-stream");
    }
}
