//! The virtio-net control virtqueue: what each command means for this device. Pure.
//!
//! A control command is `class: u8, command: u8, data…` in device-readable descriptors and
//! one device-writable `ack` byte. QEMU handles the control queue of a vhost-user NIC itself
//! (it never hands it to the backend), so these answers matter for other frontends only.
//! Receive filtering (`RX`, `MAC`) is accepted and ignored: the TAP delivers every frame the
//! bridge sends it, and the guest's stack filters.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};

pub const ACK_OK: u8 = VIRTIO_NET_OK as u8;
pub const ACK_ERR: u8 = VIRTIO_NET_ERR as u8;

/// What a command changes in the device besides its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// ANNOUNCE_ACK: the driver has announced itself; clear `VIRTIO_NET_S_ANNOUNCE`.
    AnnounceAcked,
    /// MQ_VQ_PAIRS_SET: the driver now uses this many queue pairs.
    QueuePairs(u16),
}

/// The answer to one command: the ack byte and the effect to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub ack: u8,
    pub effect: Effect,
}

impl Answer {
    const fn ok(effect: Effect) -> Answer {
        Answer {
            ack: ACK_OK,
            effect,
        }
    }

    const ERR: Answer = Answer {
        ack: ACK_ERR,
        effect: Effect::None,
    };
}

/// Answers a command: `bytes` is everything the driver wrote (class, command, data).
pub fn answer(bytes: &[u8], queue_pairs: u16) -> Answer {
    let (Some(&class), Some(&command)) = (bytes.first(), bytes.get(1)) else {
        return Answer::ERR;
    };
    let data = bytes.get(2..).unwrap_or_default();
    match u32::from(class) {
        VIRTIO_NET_CTRL_RX if u32::from(command) <= VIRTIO_NET_CTRL_RX_NOBCAST => {
            // One byte: on or off.
            if data.len() == 1 {
                Answer::ok(Effect::None)
            } else {
                Answer::ERR
            }
        }
        VIRTIO_NET_CTRL_MAC => match u32::from(command) {
            VIRTIO_NET_CTRL_MAC_ADDR_SET if data.len() == 6 => Answer::ok(Effect::None),
            VIRTIO_NET_CTRL_MAC_TABLE_SET if mac_tables_valid(data) => Answer::ok(Effect::None),
            _ => Answer::ERR,
        },
        VIRTIO_NET_CTRL_ANNOUNCE if u32::from(command) == VIRTIO_NET_CTRL_ANNOUNCE_ACK => {
            Answer::ok(Effect::AnnounceAcked)
        }
        VIRTIO_NET_CTRL_MQ if u32::from(command) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET => match data {
            [low, high] => {
                let pairs = u16::from_le_bytes([*low, *high]);
                if (1..=queue_pairs).contains(&pairs) {
                    Answer::ok(Effect::QueuePairs(pairs))
                } else {
                    Answer::ERR
                }
            }
            _ => Answer::ERR,
        },
        _ => Answer::ERR,
    }
}

/// MAC_TABLE_SET carries two tables (unicast, multicast), each `le32 entries` then
/// `entries * 6` bytes, and nothing after them.
fn mac_tables_valid(data: &[u8]) -> bool {
    let mut rest = data;
    for _ in 0..2 {
        let Some((count, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        let Some(len) = (u32::from_le_bytes(*count) as usize).checked_mul(6) else {
            return false;
        };
        let Some(tail) = tail.get(len..) else {
            return false;
        };
        rest = tail;
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_mode_commands_are_accepted_with_one_byte() {
        for command in 0..=5u8 {
            assert_eq!(answer(&[0, command, 1], 1), Answer::ok(Effect::None));
        }
        assert_eq!(answer(&[0, 6, 1], 1), Answer::ERR);
        assert_eq!(answer(&[0, 0], 1), Answer::ERR);
        assert_eq!(answer(&[0, 0, 1, 1], 1), Answer::ERR);
    }

    #[test]
    fn mac_commands_are_accepted_when_well_formed() {
        assert_eq!(answer(&[1, 1, 2, 0, 0, 0, 0, 1], 1).ack, ACK_OK);
        assert_eq!(answer(&[1, 1, 2, 0, 0], 1).ack, ACK_ERR);
        let mut table = vec![1, 0];
        table.extend(1u32.to_le_bytes());
        table.extend([2, 0, 0, 0, 0, 1]);
        table.extend(0u32.to_le_bytes());
        assert_eq!(answer(&table, 1).ack, ACK_OK);
        table.push(0);
        assert_eq!(answer(&table, 1).ack, ACK_ERR, "trailing byte");
        let mut huge = vec![1, 0];
        huge.extend(u32::MAX.to_le_bytes());
        assert_eq!(answer(&huge, 1).ack, ACK_ERR);
        assert_eq!(answer(&[1, 0, 0, 0], 1).ack, ACK_ERR, "truncated count");
    }

    #[test]
    fn announce_ack_clears_the_announcement() {
        assert_eq!(answer(&[3, 0], 1), Answer::ok(Effect::AnnounceAcked));
        assert_eq!(answer(&[3, 1], 1), Answer::ERR);
    }

    #[test]
    fn queue_pairs_must_be_in_range() {
        assert_eq!(answer(&[4, 0, 2, 0], 4), Answer::ok(Effect::QueuePairs(2)));
        assert_eq!(answer(&[4, 0, 0, 0], 4), Answer::ERR);
        assert_eq!(answer(&[4, 0, 5, 0], 4), Answer::ERR);
        assert_eq!(answer(&[4, 0, 2], 4), Answer::ERR);
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(answer(&[], 1), Answer::ERR);
        assert_eq!(answer(&[0], 1), Answer::ERR);
        assert_eq!(answer(&[2, 0, 1, 0], 1), Answer::ERR, "VLAN not offered");
        assert_eq!(answer(&[5, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1), Answer::ERR);
        assert_eq!(answer(&[0xff, 0xff], 1), Answer::ERR);
    }
}
