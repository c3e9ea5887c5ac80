//! Frames between descriptor chains and the host: the only module that touches guest
//! buffers. Everything goes through `virtio_queue`'s `Reader`/`Writer`, so each byte written
//! into guest memory is marked in the dirty log when the frontend asked for one.
//!
//! - TX: [`read_tx_chain`] copies a chain into a private buffer, checks it with
//!   [`frame`](crate::frame) and returns a [`TxFrame`] for the sink.
//! - RX: [`deliver`] puts one frame from the TAP into the guest's receive buffers, across
//!   several chains with MRG_RXBUF, or leaves the ring untouched when the buffers do not
//!   suffice yet.
//! - Control queue: [`read_ctrl_chain`] / [`write_ctrl_ack`].

use std::io::{Read, Write};
use std::ops::Deref;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::GuestMemory;

use crate::frame::{
    check_chain, set_num_buffers, validate_tx, FrameError, TxOffloads, VNET_HDR_LEN,
};
use crate::peer::FrameBatch;
use crate::sink::TxFrame;

/// Largest control command we read (a MAC table of about 10,000 addresses).
pub const MAX_CTRL_BYTES: usize = 64 * 1024;

/// Why a chain was not used.
#[derive(Debug, Error)]
pub enum ChainError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("descriptor chain points outside guest memory: {0}")]
    Memory(String),
    #[error("control command of {0} bytes is too long")]
    LongCommand(usize),
    #[error("control chain has no room for the ack byte")]
    NoAck,
}

/// Copies a TX chain out of guest memory and validates it.
pub fn read_tx_chain<M>(
    chain: DescriptorChain<M>,
    header_len: usize,
    offloads: TxOffloads,
) -> Result<TxFrame, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    let total = tx_chain_len(&chain, header_len)?;
    let mut bytes = vec![0u8; total];
    copy_tx_chain(&chain, header_len, offloads, &mut bytes)?;
    Ok(TxFrame::new(bytes, header_len))
}

/// Copies a TX chain with a 12-byte header straight into `batch` (no buffer of its own),
/// validated like [`read_tx_chain`]; a refused chain leaves the batch as it was.
pub fn read_tx_chain_into<M>(
    chain: DescriptorChain<M>,
    offloads: TxOffloads,
    batch: &mut FrameBatch,
) -> Result<(), ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    let total = tx_chain_len(&chain, VNET_HDR_LEN)?;
    batch.append(total, |bytes| {
        copy_tx_chain(&chain, VNET_HDR_LEN, offloads, bytes)
    })
}

/// The length of a TX chain, checked (readable descriptors only, within the frame limits).
fn tx_chain_len<M>(chain: &DescriptorChain<M>, header_len: usize) -> Result<usize, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    Ok(check_chain(
        chain
            .clone()
            .map(|descriptor| (descriptor.len(), descriptor.is_write_only())),
        header_len,
    )?)
}

/// Copies a checked chain into `bytes` (its length), validates the frame and normalises its
/// header for the TAP.
fn copy_tx_chain<M>(
    chain: &DescriptorChain<M>,
    header_len: usize,
    offloads: TxOffloads,
    bytes: &mut [u8],
) -> Result<(), ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    let memory = chain.memory();
    let mut reader = chain
        .clone()
        .reader(memory)
        .map_err(|error| ChainError::Memory(error.to_string()))?;
    reader
        .read_exact(bytes)
        .map_err(|error| ChainError::Memory(error.to_string()))?;
    let header = validate_tx(bytes, header_len, offloads)?;
    let normalised = header.for_tap().encode();
    bytes[..header_len].copy_from_slice(&normalised[..header_len]);
    Ok(())
}

/// How [`deliver`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The frame is in the guest's buffers; the chains are on the used ring.
    Delivered {
        /// Chains the frame occupies (`num_buffers`).
        buffers: u16,
        /// Malformed chains returned unused on the way.
        bad_buffers: u16,
    },
    /// Not enough buffers yet; the ring is as it was. Notifications are enabled, so the
    /// guest kicks when it posts more; `retry` says buffers arrived meanwhile.
    NoBuffers { retry: bool },
    /// The frame can never fit the guest's buffers; drop it. The ring is as it was.
    TooLarge,
}

/// A receive chain taken from the ring for the frame being delivered.
struct Reserved<'a, B> {
    head: u16,
    writer: Writer<'a, B>,
}

/// Puts `frame` (`header_len` bytes of header, then the Ethernet frame) into the guest's
/// receive buffers: one chain, or with `mergeable` as many as it takes, `num_buffers` set.
/// Chains are reserved first and written only once the frame fits, so a frame either goes in
/// whole or leaves the ring untouched.
pub fn deliver<G>(
    queue: &mut Queue,
    memory: &G,
    frame: &mut [u8],
    header_len: usize,
    mergeable: bool,
) -> Result<Delivery, virtio_queue::Error>
where
    G: GuestMemory,
    for<'a> G::Bitmap: WithBitmapSlice<'a>,
{
    let mut popped: u16 = 0;
    let mut bad: Vec<u16> = Vec::new();
    let mut reserved: Vec<Reserved<'_, _>> = Vec::new();
    let mut capacity = 0usize;
    while capacity < frame.len() || reserved.is_empty() {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            if popped >= queue.size() {
                undo(queue, popped);
                return Ok(Delivery::TooLarge);
            }
            // Ask for a kick at the current end of the ring before giving the chains back,
            // so that the guest's next buffer wakes us.
            let retry = queue.enable_notification(memory)?;
            undo(queue, popped);
            return Ok(Delivery::NoBuffers { retry });
        };
        popped = popped.saturating_add(1);
        let head = chain.head_index();
        let Ok(writer) = chain.writer(memory) else {
            bad.push(head);
            continue;
        };
        let available = writer.available_bytes();
        let needed = if reserved.is_empty() { header_len } else { 1 };
        if available < needed {
            bad.push(head);
            continue;
        }
        if !mergeable && available < frame.len() {
            // Without MRG_RXBUF the guest's buffers are all of one size: a frame larger
            // than one never fits.
            undo(queue, popped);
            return Ok(Delivery::TooLarge);
        }
        capacity = capacity.saturating_add(available);
        reserved.push(Reserved { head, writer });
    }
    let buffers = u16::try_from(reserved.len()).unwrap_or(u16::MAX);
    set_num_buffers(&mut frame[..header_len], buffers);
    for &head in &bad {
        queue.add_used(memory, head, 0)?;
    }
    // The frame's chains go on the used ring in order, one after another: the driver reads
    // `num_buffers` from the first and takes the others as they follow.
    let mut offset = 0;
    for Reserved { head, mut writer } in reserved {
        let end = frame.len().min(offset + writer.available_bytes());
        let written = write_part(&mut writer, &frame[offset..end]);
        offset = end;
        queue.add_used(memory, head, written)?;
    }
    Ok(Delivery::Delivered {
        buffers,
        bad_buffers: u16::try_from(bad.len()).unwrap_or(u16::MAX),
    })
}

/// Writes what fits; the slices were checked when the writer was made, so a short write only
/// happens if the guest changed its memory map under us (the used length says how much).
fn write_part<B: BitmapSlice>(writer: &mut Writer<'_, B>, bytes: &[u8]) -> u32 {
    let _ = writer.write_all(bytes);
    u32::try_from(writer.bytes_written()).unwrap_or(u32::MAX)
}

fn undo(queue: &mut Queue, popped: u16) {
    for _ in 0..popped {
        queue.go_to_previous_position();
    }
}

/// Reads a control command (class, command, data) from a control chain.
pub fn read_ctrl_chain<M>(chain: &DescriptorChain<M>) -> Result<Vec<u8>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    let memory = chain.memory();
    let mut reader = chain
        .clone()
        .reader(memory)
        .map_err(|error| ChainError::Memory(error.to_string()))?;
    let len = reader.available_bytes();
    if len > MAX_CTRL_BYTES {
        return Err(ChainError::LongCommand(len));
    }
    let mut bytes = vec![0u8; len];
    reader
        .read_exact(&mut bytes)
        .map_err(|error| ChainError::Memory(error.to_string()))?;
    Ok(bytes)
}

/// Writes the ack byte into the first writable byte of a control chain; returns the used
/// length.
pub fn write_ctrl_ack<M>(chain: DescriptorChain<M>, ack: u8) -> Result<u32, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    let memory = chain.memory();
    let mut writer = chain
        .clone()
        .writer(memory)
        .map_err(|error| ChainError::Memory(error.to_string()))?;
    if writer.available_bytes() == 0 {
        return Err(ChainError::NoAck);
    }
    writer
        .write_all(&[ack])
        .map_err(|error| ChainError::Memory(error.to_string()))?;
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{VnetHeader, FLAG_NEEDS_CSUM, GSO_TCPV4, VNET_HDR_LEN};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const QUEUE_SIZE: u16 = 16;
    const DATA: u64 = 0x10_0000;

    type Memory = GuestMemoryMmap<()>;

    fn memory() -> Memory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("guest memory")
    }

    fn descriptor(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Posts one chain per entry of `chains` (each a list of descriptors), then returns the
    /// queue.
    fn queue_with(
        memory: &Memory,
        mock: &MockSplitQueue<'_, Memory>,
        chains: &[Vec<RawDescriptor>],
    ) -> Queue {
        let mut index = 0u16;
        for chain in chains {
            let mut linked = Vec::new();
            for (position, raw) in chain.iter().enumerate() {
                let desc = SplitDescriptor::from(*raw);
                let last = position + 1 == chain.len();
                let flags = if last {
                    desc.flags()
                } else {
                    desc.flags() | virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { index + position as u16 + 1 };
                linked.push(RawDescriptor::from(SplitDescriptor::new(
                    desc.addr().0,
                    desc.len(),
                    flags,
                    next,
                )));
            }
            mock.add_desc_chains(&linked, index).expect("post chain");
            index += chain.len() as u16;
        }
        let _ = memory;
        mock.create_queue::<Queue>().expect("queue")
    }

    fn tx_bytes(header: VnetHeader, frame_len: usize) -> Vec<u8> {
        let mut bytes = header.encode().to_vec();
        bytes.extend((0..frame_len).map(|i| i as u8));
        bytes
    }

    /// Writes `bytes` into guest memory at DATA and returns descriptors that split it into
    /// pieces of `piece` bytes.
    fn readable(memory: &Memory, bytes: &[u8], piece: usize) -> Vec<RawDescriptor> {
        memory
            .write_slice(bytes, GuestAddress(DATA))
            .expect("write chain data");
        bytes
            .chunks(piece)
            .enumerate()
            .map(|(i, chunk)| descriptor(DATA + (i * piece) as u64, chunk.len() as u32, false))
            .collect()
    }

    fn pop<'a>(queue: &mut Queue, memory: &'a Memory) -> DescriptorChain<&'a Memory> {
        queue.pop_descriptor_chain(memory).expect("a chain")
    }

    #[test]
    fn tx_chain_split_over_descriptors_is_copied_whole() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let bytes = tx_bytes(VnetHeader::default(), 100);
        let chain = readable(&memory, &bytes, 7);
        let mut queue = queue_with(&memory, &mock, &[chain]);
        let frame = read_tx_chain(pop(&mut queue, &memory), 12, TxOffloads::default())
            .expect("valid frame");
        assert_eq!(frame.bytes(), &bytes[..]);
        assert_eq!(frame.frame().len(), 100);
    }

    #[test]
    fn tx_header_is_normalised_for_the_tap() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let header = VnetHeader {
            flags: FLAG_NEEDS_CSUM | 2,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 9,
        };
        let bytes = tx_bytes(header, 3000);
        let mut queue = queue_with(&memory, &mock, &[readable(&memory, &bytes, 4096)]);
        let offloads = TxOffloads {
            csum: true,
            tso4: true,
            ..TxOffloads::default()
        };
        let frame = read_tx_chain(pop(&mut queue, &memory), 12, offloads).expect("valid");
        let sent = VnetHeader::parse(frame.bytes()).expect("header");
        assert_eq!(sent.flags, FLAG_NEEDS_CSUM);
        assert_eq!(sent.num_buffers, 0);
        assert_eq!(sent.gso_size, 1448);
        assert_eq!(&frame.bytes()[12..], &bytes[12..]);
    }

    #[test]
    fn tx_chains_are_read_straight_into_a_batch_and_a_bad_one_leaves_it_as_it_was() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let bytes = tx_bytes(VnetHeader::default(), 100);
        let good = readable(&memory, &bytes, 56);
        let bad = vec![descriptor(DATA, 8, false)];
        let mut queue = queue_with(&memory, &mock, &[good.clone(), bad, good]);
        let mut batch = FrameBatch::default();
        let offloads = TxOffloads::default();
        read_tx_chain_into(pop(&mut queue, &memory), offloads, &mut batch).expect("valid");
        let refused = read_tx_chain_into(pop(&mut queue, &memory), offloads, &mut batch);
        assert!(matches!(
            refused,
            Err(ChainError::Frame(FrameError::ShortChain { .. }))
        ));
        read_tx_chain_into(pop(&mut queue, &memory), offloads, &mut batch).expect("valid");
        let (payload, frames) = batch.take();
        assert_eq!(frames, 2);
        let split: Vec<_> = crate::peer::split_batch(&payload)
            .collect::<Result<_, _>>()
            .expect("whole frames");
        assert_eq!(split, vec![&bytes[..], &bytes[..]]);
    }

    #[test]
    fn tx_chain_with_a_write_only_descriptor_is_refused() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let bytes = tx_bytes(VnetHeader::default(), 60);
        let mut chain = readable(&memory, &bytes, 36);
        chain.push(descriptor(DATA + 0x1000, 16, true));
        let mut queue = queue_with(&memory, &mock, &[chain]);
        let error = read_tx_chain(pop(&mut queue, &memory), 12, TxOffloads::default())
            .expect_err("refused");
        assert!(matches!(
            error,
            ChainError::Frame(FrameError::WriteOnlyDescriptor { index: 2 })
        ));
    }

    #[test]
    fn tx_chain_too_short_or_too_long_is_refused() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let short = vec![descriptor(DATA, 8, false)];
        let long = vec![
            descriptor(DATA, 60_000, false),
            descriptor(DATA, 10_000, false),
        ];
        let mut queue = queue_with(&memory, &mock, &[short, long]);
        let short = read_tx_chain(pop(&mut queue, &memory), 12, TxOffloads::default());
        assert!(matches!(
            short,
            Err(ChainError::Frame(FrameError::ShortChain { len: 8, .. }))
        ));
        let long = read_tx_chain(pop(&mut queue, &memory), 12, TxOffloads::default());
        assert!(matches!(
            long,
            Err(ChainError::Frame(FrameError::LongChain { .. }))
        ));
    }

    #[test]
    fn tx_chain_outside_guest_memory_is_refused() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let chain = vec![descriptor(0x3f_fff0, 100, false)];
        let mut queue = queue_with(&memory, &mock, &[chain]);
        let result = read_tx_chain(pop(&mut queue, &memory), 12, TxOffloads::default());
        assert!(matches!(result, Err(ChainError::Memory(_))), "{result:?}");
    }

    #[test]
    fn tx_chain_with_bad_gso_is_refused() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let header = VnetHeader {
            gso_type: 0x42,
            ..VnetHeader::default()
        };
        let bytes = tx_bytes(header, 60);
        let mut queue = queue_with(&memory, &mock, &[readable(&memory, &bytes, 4096)]);
        let result = read_tx_chain(pop(&mut queue, &memory), 12, TxOffloads::default());
        assert!(matches!(
            result,
            Err(ChainError::Frame(FrameError::UnknownGsoType(0x42)))
        ));
    }

    fn rx_frame(len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend((0..len).map(|i| (i % 251) as u8));
        frame
    }

    fn used(memory: &Memory, mock: &MockSplitQueue<'_, Memory>, slot: u64) -> (u32, u32) {
        let base = mock.used_addr().0 + 4 + slot * 8;
        let id: u32 = memory.read_obj(GuestAddress(base)).expect("used id");
        let len: u32 = memory.read_obj(GuestAddress(base + 4)).expect("used len");
        (id, len)
    }

    fn used_index(memory: &Memory, mock: &MockSplitQueue<'_, Memory>) -> u16 {
        memory
            .read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx")
    }

    #[test]
    fn rx_frame_fits_one_buffer() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let buffer = vec![descriptor(DATA, 2048, true)];
        let mut queue = queue_with(&memory, &mock, &[buffer]);
        let mut frame = rx_frame(1000);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, false).expect("deliver");
        assert_eq!(
            delivery,
            Delivery::Delivered {
                buffers: 1,
                bad_buffers: 0
            }
        );
        assert_eq!(used(&memory, &mock, 0), (0, 1012));
        let mut copy = vec![0u8; 1012];
        memory
            .read_slice(&mut copy, GuestAddress(DATA))
            .expect("read back");
        assert_eq!(copy[10..12], [1, 0], "num_buffers is 1");
        assert_eq!(copy[12..], frame[12..]);
    }

    #[test]
    fn rx_frame_spans_merged_buffers() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let buffers: Vec<_> = (0..4)
            .map(|i| vec![descriptor(DATA + i * 0x1000, 1500, true)])
            .collect();
        let mut queue = queue_with(&memory, &mock, &buffers);
        let mut frame = rx_frame(4000);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, true).expect("deliver");
        assert_eq!(
            delivery,
            Delivery::Delivered {
                buffers: 3,
                bad_buffers: 0
            }
        );
        assert_eq!(used(&memory, &mock, 0), (0, 1500));
        assert_eq!(used(&memory, &mock, 1), (1, 1500));
        assert_eq!(used(&memory, &mock, 2), (2, 1012));
        let mut header = [0u8; 12];
        memory
            .read_slice(&mut header, GuestAddress(DATA))
            .expect("header");
        assert_eq!(header[10..12], [3, 0], "num_buffers is 3");
        let mut tail = vec![0u8; 1012];
        memory
            .read_slice(&mut tail, GuestAddress(DATA + 0x2000))
            .expect("tail");
        assert_eq!(tail, frame[3000..]);
        // The fourth buffer is still available.
        assert_eq!(queue.next_avail(), 3);
    }

    #[test]
    fn rx_without_enough_buffers_leaves_the_ring_untouched() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let buffers: Vec<_> = (0..2)
            .map(|i| vec![descriptor(DATA + i * 0x1000, 1500, true)])
            .collect();
        let mut queue = queue_with(&memory, &mock, &buffers);
        let mut frame = rx_frame(4000);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, true).expect("deliver");
        assert_eq!(delivery, Delivery::NoBuffers { retry: false });
        assert_eq!(queue.next_avail(), 0, "nothing consumed");
        assert_eq!(used_index(&memory, &mock), 0, "nothing used");
        // A smaller frame still goes through afterwards.
        let mut small = rx_frame(100);
        let delivery = deliver(&mut queue, &memory, &mut small, 12, true).expect("deliver");
        assert!(matches!(delivery, Delivery::Delivered { buffers: 1, .. }));
    }

    #[test]
    fn rx_on_an_empty_ring_waits() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let mut queue = queue_with(&memory, &mock, &[]);
        let mut frame = rx_frame(60);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, true).expect("deliver");
        assert_eq!(delivery, Delivery::NoBuffers { retry: false });
    }

    #[test]
    fn rx_frame_larger_than_one_buffer_without_merging_is_dropped() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let buffers: Vec<_> = (0..2)
            .map(|i| vec![descriptor(DATA + i * 0x1000, 1526, true)])
            .collect();
        let mut queue = queue_with(&memory, &mock, &buffers);
        let mut frame = rx_frame(2000);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, false).expect("deliver");
        assert_eq!(delivery, Delivery::TooLarge);
        assert_eq!(queue.next_avail(), 0, "buffer kept for the next frame");
    }

    #[test]
    fn rx_bad_buffers_are_returned_empty_before_the_frame() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let buffers = vec![
            vec![descriptor(DATA, 4, true)],           // smaller than the header
            vec![descriptor(0x3f_ff00, 0x1000, true)], // outside guest memory
            vec![descriptor(DATA + 0x1000, 2048, true)],
        ];
        let mut queue = queue_with(&memory, &mock, &buffers);
        let mut frame = rx_frame(500);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, true).expect("deliver");
        assert_eq!(
            delivery,
            Delivery::Delivered {
                buffers: 1,
                bad_buffers: 2
            }
        );
        assert_eq!(used(&memory, &mock, 0), (0, 0));
        assert_eq!(used(&memory, &mock, 1), (1, 0));
        assert_eq!(used(&memory, &mock, 2), (2, 512));
    }

    #[test]
    fn rx_frame_larger_than_the_whole_ring_is_dropped() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 2);
        let buffers: Vec<_> = (0..2)
            .map(|i| vec![descriptor(DATA + i * 0x1000, 100, true)])
            .collect();
        let mut queue = queue_with(&memory, &mock, &buffers);
        let mut frame = rx_frame(1000);
        let delivery = deliver(&mut queue, &memory, &mut frame, 12, true).expect("deliver");
        assert_eq!(delivery, Delivery::TooLarge);
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn ctrl_command_is_read_and_acked() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        memory
            .write_slice(&[3, 0], GuestAddress(DATA))
            .expect("command");
        let chain = vec![
            descriptor(DATA, 2, false),
            descriptor(DATA + 0x100, 1, true),
        ];
        let mut queue = queue_with(&memory, &mock, &[chain]);
        let chain = pop(&mut queue, &memory);
        assert_eq!(read_ctrl_chain(&chain).expect("read"), vec![3, 0]);
        assert_eq!(write_ctrl_ack(chain, 0).expect("ack"), 1);
        let ack: u8 = memory
            .read_obj(GuestAddress(DATA + 0x100))
            .expect("ack byte");
        assert_eq!(ack, 0);
    }

    #[test]
    fn ctrl_chain_without_ack_room_is_refused() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let chain = vec![descriptor(DATA, 2, false)];
        let mut queue = queue_with(&memory, &mock, &[chain]);
        let chain = pop(&mut queue, &memory);
        assert!(matches!(write_ctrl_ack(chain, 0), Err(ChainError::NoAck)));
    }
}
