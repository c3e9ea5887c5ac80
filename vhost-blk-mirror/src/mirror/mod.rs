//! The disk as the queue workers see it: the local image, and, when this daemon is a
//! primary, the peer's copy behind it.
//!
//! Workers call [`Mirror`] with whole requests; it decides whether a request completes now
//! ([`Outcome::Ready`]) or when the peer has acknowledged it ([`Outcome::Waiting`]).

use std::io;
use std::sync::Arc;

use crate::image::Image;
use crate::request::Status;
use crate::ticket::{Outcome, Waker};

/// Largest guest request accepted, in bytes. The guest is told `SEG_MAX` × `SIZE_MAX`, which
/// is below this; a chain announcing more is refused rather than buffered.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// The local image plus, on a primary, the replication to the peer.
#[derive(Debug)]
pub struct Mirror {
    image: Arc<Image>,
}

impl Mirror {
    /// A disk served from the local image alone.
    pub fn standalone(image: Image) -> Mirror {
        Mirror {
            image: Arc::new(image),
        }
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(buf, offset)
    }

    pub fn write(&self, offset: u64, data: Vec<u8>, _waker: &Arc<Waker>) -> io::Result<Outcome> {
        self.image.write_at(&data, offset)?;
        Ok(Outcome::Ready(Status::Ok))
    }

    pub fn flush(&self, _waker: &Arc<Waker>) -> io::Result<Outcome> {
        self.image.flush()?;
        Ok(Outcome::Ready(Status::Ok))
    }

    pub fn discard(&self, offset: u64, len: u64, _waker: &Arc<Waker>) -> io::Result<Outcome> {
        self.image.discard(offset, len)?;
        Ok(Outcome::Ready(Status::Ok))
    }

    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        _waker: &Arc<Waker>,
    ) -> io::Result<Outcome> {
        self.image.write_zeroes(offset, len, unmap)?;
        Ok(Outcome::Ready(Status::Ok))
    }
}
