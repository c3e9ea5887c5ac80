//! A vhost-user-blk device as QEMU would drive it, without a VM: connect, negotiate, read the
//! config space, share guest memory, set up the virtqueues, optionally turn on dirty logging.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::VringConfigData;

use crate::blk::{bit, feature, BlkConfig, Response, CONFIG_BYTES};
use crate::frontend::{Session, SessionError};
use crate::memory::{DirtyLog, GuestRam, MemoryError, PAGE_SIZE};
use crate::queue::{BlkQueue, QueueError, QueueSetup};
use crate::ring::RingLayout;

/// Virtio features we accept by default when offered: everything a plain virtio-blk driver
/// uses, without EVENT_IDX, INDIRECT_DESC or LOG_ALL (see [`DeviceOptions`] helpers).
pub const DEFAULT_FEATURES: u64 = bit(feature::VERSION_1)
    | bit(feature::PROTOCOL_FEATURES)
    | bit(feature::SIZE_MAX)
    | bit(feature::SEG_MAX)
    | bit(feature::GEOMETRY)
    | bit(feature::RO)
    | bit(feature::BLK_SIZE)
    | bit(feature::FLUSH)
    | bit(feature::TOPOLOGY)
    | bit(feature::CONFIG_WCE)
    | bit(feature::MQ)
    | bit(feature::DISCARD)
    | bit(feature::WRITE_ZEROES);

/// Protocol features we accept by default when offered.
pub const DEFAULT_PROTOCOL_FEATURES: u64 = VhostUserProtocolFeatures::MQ.bits()
    | VhostUserProtocolFeatures::CONFIG.bits()
    | VhostUserProtocolFeatures::REPLY_ACK.bits();

/// Errors of device setup.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("vhost-user request failed")]
    Session(#[from] SessionError),
    #[error("guest memory setup failed")]
    Memory(#[from] MemoryError),
    #[error("queue error")]
    Queue(#[from] QueueError),
    #[error("cannot duplicate the vhost-user socket")]
    Socket(#[source] std::io::Error),
    #[error("the backend did not negotiate the CONFIG protocol feature; no capacity known")]
    ConfigUnavailable,
    #[error("{wanted} queues wanted, the backend has {available}")]
    TooManyQueues { wanted: u16, available: u64 },
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadQueueSize(u16),
    #[error("{size_bytes} bytes of guest memory cannot hold {queues} queues of {queue_size}")]
    MemoryTooSmall {
        size_bytes: u64,
        queues: u16,
        queue_size: u16,
    },
    #[error("dirty logging needs {missing}, which the backend did not negotiate")]
    DirtyLogUnsupported { missing: &'static str },
    #[error("queue {0} does not exist or was taken")]
    NoQueue(u16),
}

type Result<T> = std::result::Result<T, DeviceError>;

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Guest RAM size (memfd), a multiple of 4 KiB; all queues' rings and buffers live in it.
    pub memory_size_bytes: u64,
    /// Guest physical address of that RAM (not 0, so GPA/offset mix-ups show).
    pub guest_base_address: u64,
    /// Number of virtqueues to set up.
    pub queue_count: u16,
    /// Descriptors per virtqueue (power of two).
    pub queue_size: u16,
    /// Virtio features to accept if offered; typed requests use indirect tables when
    /// INDIRECT_DESC is negotiated, and the rings use EVENT_IDX when that is.
    pub wanted_features: u64,
    /// Protocol features to accept if offered.
    pub wanted_protocol_features: u64,
    /// Negotiate LOG_ALL and LOG_SHMFD and share a dirty log (see [`BlkDevice::dirty_log`]).
    pub dirty_log: bool,
    /// Bytes of config space to read.
    pub config_len: u32,
    /// Deadline of every control request and of the one-shot I/O calls.
    pub timeout_ms: u64,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            memory_size_bytes: 64 << 20,
            guest_base_address: 1 << 30,
            queue_count: 1,
            queue_size: 128,
            wanted_features: DEFAULT_FEATURES,
            wanted_protocol_features: DEFAULT_PROTOCOL_FEATURES,
            dirty_log: false,
            config_len: CONFIG_BYTES,
            timeout_ms: 5000,
        }
    }
}

impl DeviceOptions {
    /// Also accept VIRTIO_RING_F_EVENT_IDX.
    pub fn with_event_idx(mut self) -> Self {
        self.wanted_features |= bit(feature::EVENT_IDX);
        self
    }

    /// Also accept VIRTIO_RING_F_INDIRECT_DESC (typed requests then go through indirect tables).
    pub fn with_indirect(mut self) -> Self {
        self.wanted_features |= bit(feature::INDIRECT_DESC);
        self
    }

    /// Turn dirty logging on.
    pub fn with_dirty_log(mut self) -> Self {
        self.dirty_log = true;
        self
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn wanted(&self) -> (u64, u64) {
        if !self.dirty_log {
            return (self.wanted_features, self.wanted_protocol_features);
        }
        (
            self.wanted_features | bit(feature::LOG_ALL),
            self.wanted_protocol_features | VhostUserProtocolFeatures::LOG_SHMFD.bits(),
        )
    }
}

/// What the two sides agreed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Negotiated {
    /// GET_FEATURES.
    pub offered_features: u64,
    /// What we sent with SET_FEATURES.
    pub acked_features: u64,
    /// GET_PROTOCOL_FEATURES (0 without bit 30).
    pub offered_protocol_features: u64,
    /// What we sent with SET_PROTOCOL_FEATURES.
    pub acked_protocol_features: u64,
    /// GET_QUEUE_NUM (1 without the MQ protocol feature).
    pub queue_num: u64,
}

/// Names of the vhost-user protocol feature bits set in `features` (unknown bits as `bit N`).
pub fn protocol_feature_names(features: u64) -> Vec<String> {
    let known = VhostUserProtocolFeatures::from_bits_truncate(features);
    let mut names: Vec<String> = known
        .iter_names()
        .map(|(name, _)| name.to_string())
        .collect();
    let unknown = features & !known.bits();
    names.extend(
        (0..64)
            .filter(|number| unknown & (1 << number) != 0)
            .map(|number| format!("bit {number}")),
    );
    names
}

impl Negotiated {
    /// A readable summary: hex masks and feature names of both sides.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "offered_features": format!("{:#x}", self.offered_features),
            "offered_feature_names": crate::blk::feature_names(self.offered_features),
            "acked_features": format!("{:#x}", self.acked_features),
            "acked_feature_names": crate::blk::feature_names(self.acked_features),
            "offered_protocol_features": format!("{:#x}", self.offered_protocol_features),
            "offered_protocol_feature_names":
                protocol_feature_names(self.offered_protocol_features),
            "acked_protocol_features": format!("{:#x}", self.acked_protocol_features),
            "acked_protocol_feature_names": protocol_feature_names(self.acked_protocol_features),
            "queue_num": self.queue_num,
        })
    }

    /// Whether virtio feature bit `feature` was acked.
    pub fn has_feature(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// Whether all of `features` were acked as protocol features.
    pub fn has_protocol_feature(&self, features: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol_features & features.bits() == features.bits()
    }
}

/// A connected, negotiated and running vhost-user-blk device.
#[derive(Debug)]
pub struct BlkDevice {
    session: Session,
    memory: Arc<GuestRam>,
    negotiated: Negotiated,
    config: BlkConfig,
    queues: Vec<Option<BlkQueue>>,
    dirty_log: Option<DirtyLog>,
}

/// GET_FEATURES and the protocol-feature exchange; SET_FEATURES comes later.
pub fn negotiate(session: &mut Session, options: &DeviceOptions) -> Result<Negotiated> {
    let (wanted_features, wanted_protocol_features) = options.wanted();
    session.set_owner()?;
    let offered_features = session.get_features()?;
    let mut negotiated = Negotiated {
        offered_features,
        acked_features: offered_features & wanted_features,
        queue_num: 1,
        ..Negotiated::default()
    };
    if offered_features & bit(feature::PROTOCOL_FEATURES) != 0 {
        negotiated.offered_protocol_features = session.get_protocol_features()?;
        negotiated.acked_protocol_features =
            negotiated.offered_protocol_features & wanted_protocol_features;
        session.set_protocol_features(negotiated.acked_protocol_features)?;
    }
    if negotiated.has_protocol_feature(VhostUserProtocolFeatures::MQ) {
        negotiated.queue_num = session.get_queue_num()?;
    }
    Ok(negotiated)
}

/// GET_CONFIG, parsed.
pub fn read_config(
    session: &mut Session,
    negotiated: &Negotiated,
    config_len: u32,
) -> Result<BlkConfig> {
    if !negotiated.has_protocol_feature(VhostUserProtocolFeatures::CONFIG) {
        return Err(DeviceError::ConfigUnavailable);
    }
    let bytes = session.get_config(0, config_len)?;
    Ok(BlkConfig::parse(&bytes))
}

fn check_queue_count(
    options: &DeviceOptions,
    negotiated: &Negotiated,
    config: &BlkConfig,
) -> Result<()> {
    let available = if negotiated.has_feature(feature::MQ) {
        negotiated
            .queue_num
            .min(u64::from(config.num_queues.max(1)))
    } else {
        1
    };
    if options.queue_count == 0 || u64::from(options.queue_count) > available {
        return Err(DeviceError::TooManyQueues {
            wanted: options.queue_count,
            available,
        });
    }
    let size = options.queue_size;
    if size == 0 || !size.is_power_of_two() {
        return Err(DeviceError::BadQueueSize(size));
    }
    Ok(())
}

/// Splits guest RAM into one (ring, arena) slice per queue.
fn plan_queues(options: &DeviceOptions, negotiated: &Negotiated) -> Result<Vec<QueueSetup>> {
    let too_small = DeviceError::MemoryTooSmall {
        size_bytes: options.memory_size_bytes,
        queues: options.queue_count,
        queue_size: options.queue_size,
    };
    let share = options.memory_size_bytes / u64::from(options.queue_count) / PAGE_SIZE * PAGE_SIZE;
    let ring_bytes = RingLayout::bytes_needed(options.queue_size);
    if share < ring_bytes + PAGE_SIZE {
        return Err(too_small);
    }
    let setups = (0..options.queue_count)
        .map(|index| {
            let start = options.guest_base_address + u64::from(index) * share;
            QueueSetup {
                index,
                layout: RingLayout::at(start, options.queue_size),
                arena_start: start + ring_bytes,
                arena_len: share - ring_bytes,
                event_idx: negotiated.has_feature(feature::EVENT_IDX),
                indirect: negotiated.has_feature(feature::INDIRECT_DESC),
                timeout: options.timeout(),
            }
        })
        .collect();
    Ok(setups)
}

fn start_dirty_log(
    session: &mut Session,
    negotiated: &Negotiated,
    memory: &GuestRam,
) -> Result<DirtyLog> {
    if !negotiated.has_feature(feature::LOG_ALL) {
        return Err(DeviceError::DirtyLogUnsupported {
            missing: "VHOST_F_LOG_ALL",
        });
    }
    if !negotiated.has_protocol_feature(VhostUserProtocolFeatures::LOG_SHMFD) {
        return Err(DeviceError::DirtyLogUnsupported {
            missing: "VHOST_USER_PROTOCOL_F_LOG_SHMFD",
        });
    }
    let log = DirtyLog::new(memory.end_address())?;
    session.set_log_base(&log)?;
    Ok(log)
}

/// SET_VRING_NUM/BASE/ADDR/CALL/KICK for one queue (enabling comes after all are set up).
fn start_queue(
    session: &mut Session,
    memory: &Arc<GuestRam>,
    setup: QueueSetup,
    log: bool,
) -> Result<BlkQueue> {
    let socket = session.socket_clone().map_err(DeviceError::Socket)?;
    let queue = BlkQueue::new(memory.clone(), setup, socket)?;
    let layout = setup.layout;
    let index = usize::from(setup.index);
    session.set_vring_num(index, layout.size)?;
    session.set_vring_base(index, 0)?;
    let config = VringConfigData {
        queue_max_size: layout.size,
        queue_size: layout.size,
        flags: u32::from(log),
        desc_table_addr: memory.host_address(layout.descriptors)?,
        used_ring_addr: memory.host_address(layout.used)?,
        avail_ring_addr: memory.host_address(layout.avail)?,
        log_addr: log.then_some(layout.used),
    };
    session.set_vring_addr(index, &config)?;
    session.set_vring_call(index, queue.call_eventfd())?;
    session.set_vring_kick(index, queue.kick_eventfd())?;
    Ok(queue)
}

impl BlkDevice {
    /// Connects to the vhost-user-blk socket at `path` and brings the device up.
    pub fn open(path: &Path, options: &DeviceOptions) -> Result<Self> {
        let mut session = Session::connect(path, options.timeout())?;
        let negotiated = negotiate(&mut session, options)?;
        let config = read_config(&mut session, &negotiated, options.config_len)?;
        check_queue_count(options, &negotiated, &config)?;
        let setups = plan_queues(options, &negotiated)?;
        session.set_features(negotiated.acked_features)?;
        let memory = Arc::new(GuestRam::new(
            options.guest_base_address,
            options.memory_size_bytes,
        )?);
        session.set_mem_table(&[memory.region_info()?])?;
        let dirty_log = match options.dirty_log {
            true => Some(start_dirty_log(&mut session, &negotiated, &memory)?),
            false => None,
        };
        let mut queues = Vec::with_capacity(setups.len());
        for setup in setups {
            let queue = start_queue(&mut session, &memory, setup, dirty_log.is_some())?;
            queues.push(Some(queue));
        }
        if negotiated.has_feature(feature::PROTOCOL_FEATURES) {
            for index in 0..queues.len() {
                session.set_vring_enable(index, true)?;
            }
        }
        Ok(Self {
            session,
            memory,
            negotiated,
            config,
            queues,
            dirty_log,
        })
    }

    /// The negotiated features.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The config space read at setup.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Reads the config space again (e.g. after a resize).
    pub fn refresh_config(&mut self, config_len: u32) -> Result<BlkConfig> {
        self.config = read_config(&mut self.session, &self.negotiated, config_len)?;
        Ok(self.config)
    }

    /// Disk size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_bytes()
    }

    /// Guest RAM shared with the backend.
    pub fn memory(&self) -> &Arc<GuestRam> {
        &self.memory
    }

    /// The dirty log, when set up with `dirty_log`.
    pub fn dirty_log(&self) -> Option<&DirtyLog> {
        self.dirty_log.as_ref()
    }

    /// The control session, for further vhost-user requests.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Queue `index`, unless taken.
    pub fn queue(&mut self, index: u16) -> Result<&mut BlkQueue> {
        self.queues
            .get_mut(usize::from(index))
            .and_then(Option::as_mut)
            .ok_or(DeviceError::NoQueue(index))
    }

    /// Moves all queues out (e.g. one per thread). Each holds a duplicate of the socket, so the
    /// connection stays up until the device and all queues are dropped.
    pub fn take_queues(&mut self) -> Vec<BlkQueue> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// Reads `len` bytes at `sector` on queue 0.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Response> {
        Ok(self.queue(0)?.read(sector, len)?)
    }

    /// Writes `data` at `sector` on queue 0.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<Response> {
        Ok(self.queue(0)?.write(sector, data)?)
    }

    /// Flushes on queue 0.
    pub fn flush(&mut self) -> Result<Response> {
        Ok(self.queue(0)?.flush()?)
    }

    /// GET_ID on queue 0.
    pub fn get_id(&mut self) -> Result<Response> {
        Ok(self.queue(0)?.get_id()?)
    }

    /// Discards on queue 0.
    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<Response> {
        Ok(self.queue(0)?.discard(sector, sectors)?)
    }

    /// Writes zeroes on queue 0.
    pub fn write_zeroes(&mut self, sector: u64, sectors: u32, unmap: bool) -> Result<Response> {
        Ok(self.queue(0)?.write_zeroes(sector, sectors, unmap)?)
    }
}
