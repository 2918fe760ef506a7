//! The protobuf codec of the ADS streams, with small buffers. tonic's default gives every
//! stream an 8 KiB encode and an 8 KiB decode buffer for as long as it lives; a control plane
//! holds a stream per proxy, and a proxy's requests (ACKs) are a few hundred bytes.
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// 1 KiB to start with (a buffer grows to the message it holds); responses are yielded to
/// the connection as soon as they are encoded, as tonic does past its 32 KiB default.
const BUFFERS: (usize, usize) = (1024, 32 * 1024);

pub struct Lean<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Lean<T, U> {
    fn default() -> Self {
        Lean(std::marker::PhantomData)
    }
}

impl<T, U> Codec for Lean<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFERS.0, BUFFERS.1))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFERS.0, BUFFERS.1))
    }
}
