//! Resync modes without a guest: the compare mode sends only the chunks that differ.

use std::time::Duration;

use ftvm_tests::mirror::MirrorPair;

const TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_BYTES: usize = 16 << 20;
const CHUNK_BYTES: usize = 64 << 10;

#[test]
fn compare_mode_sends_only_differing_chunks() {
    let mut pair = MirrorPair::new("resync-compare", IMAGE_BYTES as u64, 1);
    // Both copies hold the same data, except three chunks of the secondary's.
    let data: Vec<u8> = (0..IMAGE_BYTES)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2])
        .collect();
    std::fs::write(&pair.primary_options.image, &data).expect("write primary");
    let mut stale = data.clone();
    for chunk in [3usize, 100, 255] {
        stale[chunk * CHUNK_BYTES + 17] ^= 0xff;
    }
    std::fs::write(&pair.secondary_options.image, &stale).expect("write secondary");
    pair.primary_options
        .extra_args
        .push("--resync-compare".into());

    // A new secondary is Inconsistent: a full resync, which compare mode makes cheap.
    pair.start_secondary();
    pair.start_primary();
    let synced = pair.wait_in_sync(TIMEOUT);
    let resync = &synced["replication"]["resync"];
    assert_eq!(resync["bytes_done"], IMAGE_BYTES as u64, "{synced}");
    assert_eq!(
        resync["bytes_sent"],
        3 * CHUNK_BYTES as u64,
        "only the three differing chunks travel: {synced}"
    );
    pair.assert_images_identical();
}
