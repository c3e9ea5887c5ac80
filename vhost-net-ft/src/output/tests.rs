use super::*;

/// A frame of `len` bytes (a 12-byte header, then the frame) whose first frame byte is `tag`.
fn frame(tag: u8, len: usize) -> TxFrame {
    let mut bytes = vec![0u8; len.max(13)];
    bytes[12] = tag;
    TxFrame::new(bytes, 12)
}

fn tags(frames: &[HeldFrame]) -> Vec<u8> {
    frames.iter().map(|held| held.frame.frame()[0]).collect()
}

#[test]
fn off_holds_nothing() {
    let mut buffer = EpochBuffer::new();
    assert!(buffer.hold(0, frame(1, 60)).is_err());
    assert_eq!(buffer.end(0), Err(EpochError::Off));
    assert!(matches!(buffer.commit(0), Err(EpochError::Off)));
    assert!(buffer.stop().is_empty());
}

#[test]
fn a_commit_releases_exactly_the_ended_epochs_in_order() {
    let mut buffer = EpochBuffer::new();
    buffer.start(10).expect("on");
    buffer.hold(0, frame(1, 60)).expect("held");
    buffer.hold(1, frame(2, 60)).expect("held");
    assert_eq!(buffer.end(10), Ok(11));
    buffer.hold(0, frame(3, 60)).expect("held");
    assert_eq!(buffer.end(11), Ok(12));
    buffer.hold(1, frame(4, 60)).expect("held");
    assert_eq!(buffer.held_frames(), 4);
    assert_eq!(buffer.held_bytes(), 240);

    // Epoch 9 ended before output commit began: nothing of it is held.
    assert!(buffer.commit(9).expect("commit 9").is_empty());
    let first = buffer.commit(10).expect("commit 10");
    assert_eq!(tags(&first), vec![1, 2]);
    assert_eq!(
        first
            .iter()
            .map(|held| (held.epoch, held.queue))
            .collect::<Vec<_>>(),
        vec![(10, 0), (10, 1)]
    );
    assert_eq!(buffer.committed(), Some(10));
    // A retried or older commit releases nothing.
    assert!(buffer.commit(10).expect("again").is_empty());
    assert!(buffer.commit(9).expect("older").is_empty());
    assert_eq!(tags(&buffer.commit(11).expect("commit 11")), vec![3]);
    assert_eq!(buffer.held_frames(), 1);
    assert_eq!(buffer.held_bytes(), 60);
    assert_eq!(buffer.current(), Some(12));
}

#[test]
fn one_commit_may_cover_several_epochs() {
    let mut buffer = EpochBuffer::new();
    buffer.start(0).expect("on");
    for epoch in 0..5u8 {
        buffer.hold(0, frame(epoch, 60)).expect("held");
        buffer.hold(0, frame(epoch + 100, 60)).expect("held");
        buffer.end(u64::from(epoch)).expect("end");
    }
    assert_eq!(
        tags(&buffer.commit(3).expect("commit 3")),
        vec![0, 100, 1, 101, 2, 102, 3, 103]
    );
    assert_eq!(tags(&buffer.stop()), vec![4, 104]);
    assert!(!buffer.enabled());
    assert_eq!(buffer.held_bytes(), 0);
}

#[test]
fn out_of_order_and_hostile_commands_are_refused_without_effect() {
    let mut buffer = EpochBuffer::new();
    buffer.start(5).expect("on");
    buffer.hold(0, frame(1, 60)).expect("held");
    assert_eq!(
        buffer.end(4),
        Err(EpochError::NotCurrent {
            asked: 4,
            current: 5
        })
    );
    assert_eq!(
        buffer.end(6),
        Err(EpochError::NotCurrent {
            asked: 6,
            current: 5
        })
    );
    // The current epoch has not ended: its frames stay held.
    assert!(matches!(
        buffer.commit(5),
        Err(EpochError::NotEnded {
            asked: 5,
            current: 5
        })
    ));
    assert!(matches!(
        buffer.commit(u64::MAX),
        Err(EpochError::NotEnded { .. })
    ));
    assert_eq!(buffer.start(7), Err(EpochError::AlreadyOn { current: 5 }));
    // The same `on` again (a retried command) changes nothing.
    assert_eq!(buffer.start(5), Ok(()));
    assert_eq!(buffer.held_frames(), 1);
    assert_eq!(buffer.current(), Some(5));
    assert_eq!(buffer.committed(), None);

    let mut last = EpochBuffer::new();
    last.start(u64::MAX).expect("on");
    assert_eq!(
        last.end(u64::MAX),
        Err(EpochError::LastEpoch { current: u64::MAX })
    );
    assert_eq!(last.current(), Some(u64::MAX));
}

#[test]
fn off_releases_everything_in_order_and_on_starts_afresh() {
    let mut buffer = EpochBuffer::new();
    buffer.start(1).expect("on");
    buffer.hold(0, frame(1, 60)).expect("held");
    buffer.end(1).expect("end");
    buffer.hold(1, frame(2, 60)).expect("held");
    buffer.commit(0).expect("commit 0");
    assert_eq!(tags(&buffer.stop()), vec![1, 2]);
    assert_eq!((buffer.current(), buffer.committed()), (None, None));
    buffer.start(40).expect("on again");
    assert_eq!(buffer.committed(), None);
    assert!(buffer.commit(39).expect("before the start").is_empty());
}

/// Collects released frames as (queue, tag).
fn collect(into: &mut Vec<(usize, u8)>) -> impl FnMut(usize, TxFrame) + '_ {
    move |queue, frame| into.push((queue, frame.frame()[0]))
}

#[test]
fn the_shared_buffer_passes_frames_while_off_and_holds_while_on() {
    let output = OutputCommit::new(2, MIN_BUFFER_BYTES).expect("output");
    let mut sent = Vec::new();
    assert!(matches!(
        output.send(0, frame(1, 60), |frame| sent.push(frame.frame()[0])),
        Passed::Sent
    ));
    assert_eq!(sent, vec![1]);
    output.start(3).expect("on");
    assert!(matches!(
        output.send(1, frame(2, 60), |_| panic!("held frames are not sent")),
        Passed::Held
    ));
    let state = output.state();
    assert!(state.enabled);
    assert_eq!((state.held_frames, state.held_bytes), (1, 60));
    assert_eq!(state.current_epoch, Some(3));

    let mut released = Vec::new();
    let refused = output.commit(3, &mut collect(&mut released));
    assert!(refused.is_err(), "epoch 3 has not ended");
    assert_eq!(
        refused.expect_err("refused").to_string(),
        "epoch 3 has not ended (the current epoch is 3: only epochs before it can commit)"
    );
    let ended = output.end(3).expect("end");
    assert_eq!(ended.output_commit.current_epoch, Some(4));
    output.send(0, frame(3, 60), |_| panic!("held"));
    let done = output
        .commit(3, &mut collect(&mut released))
        .expect("commit");
    assert_eq!(done.released_frames, 1);
    assert_eq!(released, vec![(1, 2)]);
    assert_eq!(done.output_commit.committed_epoch, Some(3));
    assert_eq!(done.output_commit.held_frames, 1);
    // The release woke both pairs (they may wait for room).
    for pair in 0..2 {
        assert_eq!(output.room_eventfd(pair).expect("fd").read().ok(), Some(1));
    }
    let off = output.stop(&mut collect(&mut released));
    assert_eq!(off.released_frames, 1);
    assert_eq!(released, vec![(1, 2), (0, 3)]);
    assert!(!off.output_commit.enabled);
    assert_eq!(off.output_commit.released_frames, 2);
    assert!(matches!(output.send(0, frame(4, 60), |_| {}), Passed::Sent));
}

#[test]
fn a_full_buffer_stops_taking_frames_until_a_commit_frees_room() {
    let output = OutputCommit::new(1, MIN_BUFFER_BYTES).expect("output");
    output.start(0).expect("on");
    let big = 64 * 1024;
    let mut held = 0;
    while output.has_room() {
        output.send(0, frame(0, big), |_| panic!("held"));
        held += 1;
    }
    // Below the limit before the last frame: over it by less than one frame.
    let state = output.state();
    assert_eq!(state.held_frames, held);
    assert!(state.held_bytes >= MIN_BUFFER_BYTES as u64);
    assert!(state.held_bytes < (MIN_BUFFER_BYTES + big) as u64);
    output.count_full_wait();
    output.end(0).expect("end");
    assert!(!output.has_room(), "ending an epoch frees nothing");
    let mut released = Vec::new();
    output
        .commit(0, &mut collect(&mut released))
        .expect("commit");
    assert_eq!(released.len() as u64, held);
    assert!(output.has_room());
    let state = output.state();
    assert_eq!((state.held_frames, state.held_bytes), (0, 0));
    assert_eq!(state.buffer_full_waits, 1);
    assert_eq!(state.buffer_limit_bytes, MIN_BUFFER_BYTES as u64);
}

#[test]
fn frames_sent_while_off_races_never_overtake_held_ones() {
    use std::sync::{Arc, Mutex};
    let output = Arc::new(OutputCommit::new(1, DEFAULT_BUFFER_BYTES).expect("output"));
    output.start(0).expect("on");
    let wire = Arc::new(Mutex::new(Vec::<u32>::new()));
    let sender = {
        let output = Arc::clone(&output);
        let wire = Arc::clone(&wire);
        std::thread::spawn(move || {
            for index in 0..2000u32 {
                let mut bytes = vec![0u8; 16];
                bytes[12..16].copy_from_slice(&index.to_le_bytes());
                output.send(0, TxFrame::new(bytes, 12), |frame| {
                    wire.lock().expect("wire").push(number(&frame));
                });
            }
        })
    };
    // Wait until some frames are held, then turn off while the sender runs.
    while output.state().held_frames < 100 {
        std::thread::yield_now();
    }
    let wire_for_release = Arc::clone(&wire);
    output.stop(&mut |_, frame| wire_for_release.lock().expect("wire").push(number(&frame)));
    sender.join().expect("sender");
    let wire = wire.lock().expect("wire");
    assert_eq!(*wire, (0..2000).collect::<Vec<u32>>());
}

fn number(frame: &TxFrame) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&frame.frame()[..4]);
    u32::from_le_bytes(bytes)
}
