//! Storage that moves with the VM (the mission's stage 4).
//!
//! Two modes, chosen per migration:
//! - **shared**: both hosts see the same image paths. Whoever runs the VM holds an exclusive
//!   open-file-description lock on each writable image; the source flushes at pause and
//!   hands the lock over at the switchover (see [`outgoing`]), so two hosts never write one
//!   image.
//! - **copy** (shared nothing): the images are copied to a directory on the destination while
//!   the VM runs. Disk blocks are one more kind of extent for the page scheduler: each disk
//!   is mapped at its own address far above guest RAM ([`disk_addr`]), travels on a
//!   dedicated, ordered storage channel with the same codecs, progress, cancel and fault
//!   handling, is tracked by a dirty-block bitmap in the block backend
//!   ([`image::DiskImage`]), converges in rounds with RAM or — when the guest writes faster
//!   than the link — by active mirroring, and is verified by digest before Commit
//!   ([`incoming`] builds, verifies and, on any failure, deletes the copies).

pub mod image;
pub mod incoming;
pub mod outgoing;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::memory::{RamLayout, RamRegionSpec, PAGE_SIZE};
use image::DiskImage;

/// Where disks live in the transport's address space: disk `i` starts at
/// `DISK_BASE + i * DISK_STRIDE`, far above any guest-physical address.
pub const DISK_BASE: u64 = 1 << 56;
/// Address space reserved per disk (256 TiB: the largest disk).
pub const DISK_STRIDE: u64 = 1 << 48;
/// Most disks a VM may have.
pub const MAX_DISKS: usize = 16;

/// The transport address of byte 0 of disk `index`.
pub fn disk_addr(index: usize) -> u64 {
    DISK_BASE + index as u64 * DISK_STRIDE
}

/// How a migration moves the VM's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// The destination opens the same images (shared storage); their lock moves.
    #[default]
    Shared,
    /// The images are copied to the destination (shared nothing).
    Copy,
}

crate::named_enum!(StorageMode, "storage mode", { Shared => "shared", Copy => "copy" });

impl StorageMode {
    /// The mode's wire value.
    pub fn to_wire(self) -> u8 {
        match self {
            StorageMode::Shared => 0,
            StorageMode::Copy => 1,
        }
    }

    /// The mode a wire value names.
    pub fn from_wire(v: u8) -> Option<StorageMode> {
        match v {
            0 => Some(StorageMode::Shared),
            1 => Some(StorageMode::Copy),
            _ => None,
        }
    }
}

/// A disk of a VM, as the engine sees it: the device's name and its open image.
#[derive(Debug, Clone)]
pub struct VmDisk {
    /// The device's name in the VM (its descriptor id).
    pub id: String,
    /// The image behind it.
    pub image: Arc<DiskImage>,
}

/// What the source says of a disk before any byte moves, so the destination can refuse a
/// copy it cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOffer {
    /// The device's name in the VM.
    pub id: String,
    /// The image's file name (the copy gets the same name in the destination's directory).
    pub file_name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes allocated on the source (what a copy needs on the destination).
    pub allocated: u64,
    /// Guest writes are refused: copied once.
    pub read_only: bool,
}

/// The transport layout of `sizes` (one region per disk, at [`disk_addr`], whole pages), for
/// dirty bitmaps and page hashes.
pub fn disk_layout(sizes: &[u64]) -> RamLayout {
    RamLayout {
        regions: sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| RamRegionSpec {
                gpa: disk_addr(i),
                size: size.div_ceil(PAGE_SIZE) * PAGE_SIZE,
            })
            .collect(),
    }
}

/// Disk figures of a migration, in the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    /// `shared` or `copy`.
    pub mode: String,
    /// Bytes of disk blocks sent (bulk copy, dirty rounds and mirrored writes).
    pub bytes_copied: u64,
    /// Rounds that carried disk blocks.
    pub rounds: u64,
    /// Disk blocks sent while the guest was paused.
    pub dirty_blocks_in_downtime: u64,
    /// How long guest writes were mirrored synchronously, ms (0: never needed).
    pub active_mirror_ms: f64,
    /// Bytes of guest writes mirrored synchronously.
    pub mirrored_bytes: u64,
    /// Whether the source images were deleted after the migration (`--remove-source-storage`).
    pub source_removed: bool,
    /// Per disk.
    pub disks: Vec<DiskReport>,
}

/// One disk's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    /// The device's name.
    pub id: String,
    /// The image on the source.
    pub source_path: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes allocated on the source.
    pub allocated: u64,
    /// Digest of the source image (copy mode).
    pub source_digest: String,
    /// Digest of the destination's copy, as the destination verified it (copy mode).
    pub destination_digest: String,
}

/// Sets the `path` property of every descriptor naming one of `disks` to where its image
/// lives now (a copied image gets its final name only at the switchover).
pub fn refresh_paths(descriptors: &mut [crate::vm::DeviceDescriptor], disks: &[VmDisk]) {
    for d in descriptors {
        if let Some(disk) = disks.iter().find(|k| k.id == d.id) {
            for (k, v) in &mut d.properties {
                if k == "path" {
                    *v = disk.image.path().display().to_string();
                }
            }
        }
    }
}

/// The checks every migration of `disks` makes before anything moves.
pub fn check_disks(disks: &[VmDisk], mode: StorageMode) -> Result<(), String> {
    if disks.len() > MAX_DISKS {
        return Err(format!(
            "the VM has {} disks; at most {MAX_DISKS} can migrate",
            disks.len()
        ));
    }
    if mode == StorageMode::Copy {
        for d in disks {
            if d.image.is_block_device() {
                return Err(format!(
                    "disk {} is a pass-through disk ({}): shared-nothing migration copies \
                     virtual disks (image files) only; use --storage shared with storage both \
                     hosts reach",
                    d.id,
                    d.image.path().display()
                ));
            }
        }
        let mut names: Vec<String> = disks.iter().map(|d| file_name(&d.image)).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "two disks are named {:?}: their copies would collide in the destination's \
                 directory",
                w[0]
            ));
        }
    }
    Ok(())
}

/// The file name an image is copied under.
pub fn file_name(image: &DiskImage) -> String {
    image
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk.img".into())
}

/// The offers for `disks`.
pub fn offers(disks: &[VmDisk]) -> Vec<DiskOffer> {
    disks
        .iter()
        .map(|d| DiskOffer {
            id: d.id.clone(),
            file_name: file_name(&d.image),
            size: d.image.size(),
            allocated: d.image.allocated_bytes(),
            read_only: d.image.read_only(),
        })
        .collect()
}
