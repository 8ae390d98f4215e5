//! Property tests of the KV-event msgpack decoder: arbitrary bytes and corrupted payloads
//! never panic; generated batches round-trip through every encoding (positional and map
//! layouts, int and bytes hashes); multipart parsing never panics.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use bytes::Bytes;
use llmsched_kvevents::wire::parse_replay_reply;
use llmsched_kvevents::{
    BlockRemoved, BlockStored, EncodeOptions, EventBatch, KvEvent, Layout, WireMessage,
    decode_batch, encode_batch,
};
use proptest::prelude::*;
use rmpv::Value;

fn opt_string() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[A-Za-z0-9_/-]{0,12}")
}

fn extra_key() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z]{0,8}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
    ]
}

fn stored() -> impl Strategy<Value = BlockStored> {
    (
        prop::collection::vec(any::<u64>(), 0..8),
        prop::option::of(any::<u64>()),
        prop::collection::vec(any::<u32>(), 0..64),
        any::<u32>(),
        prop::option::of(any::<i64>()),
        opt_string(),
        opt_string(),
        prop::option::of(prop::collection::vec(
            prop::option::of(prop::collection::vec(extra_key(), 0..3)),
            0..4,
        )),
        prop::option::of(any::<i64>()),
        opt_string(),
        prop::option::of(any::<i64>()),
    )
        .prop_map(
            |(
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
                group_idx,
                kv_cache_spec_kind,
                kv_cache_spec_sliding_window,
            )| BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
                group_idx,
                kv_cache_spec_kind,
                kv_cache_spec_sliding_window,
            },
        )
}

fn event() -> impl Strategy<Value = KvEvent> {
    prop_oneof![
        stored().prop_map(KvEvent::BlockStored),
        (
            prop::collection::vec(any::<u64>(), 0..8),
            opt_string(),
            prop::option::of(any::<i64>())
        )
            .prop_map(|(block_hashes, medium, group_idx)| {
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes,
                    medium,
                    group_idx,
                })
            }),
        Just(KvEvent::AllBlocksCleared),
        // Tags this decoder does not know are kept as Unknown.
        "Block(Offloaded|Moved)[A-Z]{0,3}".prop_map(|tag| KvEvent::Unknown { tag }),
    ]
}

fn batch() -> impl Strategy<Value = EventBatch> {
    (
        // Finite timestamps (NaN is not equal to itself).
        -1e12f64..1e12,
        prop::collection::vec(event(), 0..6),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

fn encodings() -> impl Strategy<Value = EncodeOptions> {
    (
        prop_oneof![
            Just(Layout::Array),
            Just(Layout::Map),
            Just(Layout::MapBatch)
        ],
        any::<bool>(),
    )
        .prop_map(|(layout, hashes_as_bytes)| EncodeOptions {
            layout,
            hashes_as_bytes,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_batches_round_trip_in_every_encoding(b in batch(), opts in encodings()) {
        let bytes = encode_batch(&b, opts);
        prop_assert_eq!(decode_batch(&bytes), Ok(b));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn corrupted_payloads_never_panic(
        b in batch(),
        opts in encodings(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode_batch(&b, opts);
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let _ = decode_batch(&bytes);
        let n = cut.index(bytes.len() + 1);
        let _ = decode_batch(&bytes[..n]);
    }

    #[test]
    fn multipart_parsing_never_panics(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..6),
    ) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        if let Ok(m) = WireMessage::from_frames(&frames) {
            prop_assert_eq!(m.to_frames(), frames.clone());
        }
        let _ = parse_replay_reply(&frames);
    }
}
