//! xDS resource decoding (crates/weft-proxy/src/config/): the proxy's decoder of Listener,
//! RouteConfiguration, Cluster, ClusterLoadAssignment and Secret resources. An input is one
//! byte choosing the type, then the resource's protobuf bytes. The seeds are resources the
//! control plane's translator made (`cargo run --example seeds`); the custom mutator edits
//! them field by field in the protobuf wire format (drop, repeat, reorder, splice fields,
//! interesting varints, nested messages mutated in place), so mutants stay well-formed
//! resources that reach the checks behind decoding, besides libFuzzer's own byte mutations.
//!
//! Properties: the decoder never panics; an accepted resource can be shown in /config_dump;
//! acceptance does not depend on the encoding: the same message re-encoded canonically (what
//! any other control plane would send) is accepted as the same config.
#![no_main]
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use prost::{Message, Name};
use weft_proxy::config;

/// Decodes as the proxy does; the accepted config as its dump shows it.
fn decode(kind: u8, value: &[u8]) -> Option<serde_json::Value> {
    fn run<M: Name, T: serde::Serialize, E>(
        value: &[u8],
        f: impl Fn(&Any) -> Result<T, E>,
    ) -> Option<serde_json::Value> {
        let any = Any { type_url: M::type_url(), value: value.to_vec() };
        f(&any).ok().map(|def| serde_json::to_value(&def).expect("an accepted resource serializes"))
    }
    match kind % 5 {
        0 => run::<Listener, _, _>(value, config::listener),
        1 => run::<RouteConfiguration, _, _>(value, config::route),
        2 => run::<Cluster, _, _>(value, config::cluster),
        3 => run::<ClusterLoadAssignment, _, _>(value, config::load_assignment),
        _ => run::<Secret, _, _>(value, config::tls::bundle),
    }
}

fn canonical(kind: u8, value: &[u8]) -> Vec<u8> {
    fn re<M: Message + Default>(value: &[u8]) -> Vec<u8> {
        M::decode(value).expect("an accepted resource decodes").encode_to_vec()
    }
    match kind % 5 {
        0 => re::<Listener>(value),
        1 => re::<RouteConfiguration>(value),
        2 => re::<Cluster>(value),
        3 => re::<ClusterLoadAssignment>(value),
        _ => re::<Secret>(value),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, value)) = data.split_first() else { return };
    let Some(accepted) = decode(kind, value) else { return };
    let again = decode(kind, &canonical(kind, value));
    assert_eq!(again.as_ref(), Some(&accepted), "the canonical encoding of an accepted resource decodes otherwise");
});

// ---- structure-aware mutation in the protobuf wire format ----

enum Value {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

struct Field {
    number: u64,
    value: Value,
}

fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn parse(buf: &[u8]) -> Option<Vec<Field>> {
    let (mut at, mut fields) = (0, Vec::new());
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        if number == 0 {
            return None;
        }
        let value = match wire {
            0 => Value::Varint(varint(buf, &mut at)?),
            1 => Value::Fixed64(buf.get(at..at + 8)?.try_into().ok().inspect(|_| at += 8)?),
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?).ok()?;
                let v = buf.get(at..at.checked_add(len)?)?.to_vec();
                at += len;
                Value::Bytes(v)
            }
            5 => Value::Fixed32(buf.get(at..at + 4)?.try_into().ok().inspect(|_| at += 4)?),
            _ => return None,
        };
        fields.push(Field { number, value });
    }
    Some(fields)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        let wire = match f.value {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) => 2,
            Value::Fixed32(_) => 5,
        };
        put_varint(&mut out, f.number << 3 | wire);
        match &f.value {
            Value::Varint(v) => put_varint(&mut out, *v),
            Value::Fixed64(b) => out.extend_from_slice(b),
            Value::Bytes(b) => {
                put_varint(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::Fixed32(b) => out.extend_from_slice(b),
        }
    }
    out
}

/// xorshift: the mutator's only randomness, from libFuzzer's seed (runs stay reproducible).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [0, 1, 2, 3, 0x7f, 0x80, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// Mutates one field of a message (recursing into a nested one at random); `None` if `msg`
/// is not a well-formed message to begin with.
fn mutate_message(msg: &[u8], rng: &mut Rng, depth: u32) -> Option<Vec<u8>> {
    let mut fields = parse(msg)?;
    if fields.is_empty() {
        return None;
    }
    let i = rng.below(fields.len());
    match rng.below(8) {
        0 => drop(fields.remove(i)),
        1 => {
            let copy = Field { number: fields[i].number, value: clone(&fields[i].value) };
            fields.insert(rng.below(fields.len() + 1), copy);
        }
        2 => {
            let j = rng.below(fields.len());
            fields.swap(i, j);
        }
        3 => {
            // Another field's value under this field's number (a splice across fields).
            let j = rng.below(fields.len());
            fields[i].value = clone(&fields[j].value);
        }
        4 => fields[i].number = 1 + rng.below(40) as u64,
        _ => match &mut fields[i].value {
            Value::Varint(v) => *v = INTERESTING[rng.below(INTERESTING.len())],
            Value::Fixed64(b) => b[rng.below(8)] ^= 1 << rng.below(8),
            Value::Fixed32(b) => b[rng.below(4)] ^= 1 << rng.below(8),
            Value::Bytes(b) => {
                let nested = (depth < 12 && rng.below(4) != 0).then(|| mutate_message(b, rng, depth + 1)).flatten();
                match nested {
                    Some(m) => *b = m,
                    None => {
                        // A string or bytes field: libFuzzer's byte mutations on it alone.
                        let len = b.len();
                        b.resize(len * 2 + 16, 0);
                        let n = fuzzer_mutate(b, len, len * 2 + 16);
                        b.truncate(n);
                    }
                }
            }
        },
    }
    Some(encode(&fields))
}

fn clone(v: &Value) -> Value {
    match v {
        Value::Varint(v) => Value::Varint(*v),
        Value::Fixed64(b) => Value::Fixed64(*b),
        Value::Bytes(b) => Value::Bytes(b.clone()),
        Value::Fixed32(b) => Value::Fixed32(*b),
    }
}

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = Rng(u64::from(seed) | 1 << 40);
    // One in four: libFuzzer's own mutations (random bytes, the type byte, truncation).
    if size < 2 || rng.below(4) == 0 {
        return fuzzer_mutate(data, size, max_size);
    }
    let Some(mutated) = mutate_message(&data[1..size], &mut rng, 0) else {
        return fuzzer_mutate(data, size, max_size);
    };
    if mutated.len() + 1 > max_size {
        return fuzzer_mutate(data, size, max_size);
    }
    data[1..=mutated.len()].copy_from_slice(&mutated);
    mutated.len() + 1
});
