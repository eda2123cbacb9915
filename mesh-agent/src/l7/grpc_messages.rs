//! Counting gRPC messages as a body's bytes pass: each message is a 5-byte prefix
//! (compressed flag, big-endian length) and that many bytes, and a message may span
//! frames or share one with others. Istio's `istio_request_messages_total` and
//! `istio_response_messages_total` count them.

/// Where a body stands in its messages.
#[derive(Debug, Default, Clone)]
pub(crate) struct GrpcMessages {
    /// Prefix bytes seen of the message being read.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Messages begun.
    pub count: u64,
}

impl GrpcMessages {
    /// Takes the next bytes of the body. Counts a message when its prefix is whole, so
    /// a body cut mid-message still counts what began. Constant work per call plus
    /// per message: nothing is copied beyond the 5-byte prefix.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(data.len());
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == 5 {
                self.count += 1;
                self.remaining =
                    u64::from(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]));
                self.prefix_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn messages_are_counted_however_the_bytes_are_cut() {
        let stream: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        for cut in [1, 2, 4, 5, 6, 7, 64, stream.len()] {
            let mut m = GrpcMessages::default();
            for chunk in stream.chunks(cut) {
                m.feed(chunk);
            }
            assert_eq!(m.count, 4, "chunks of {cut}");
        }
        // A body cut inside a message counts it: it began.
        let mut m = GrpcMessages::default();
        m.feed(&message(100)[..20]);
        assert_eq!(m.count, 1);
        // A length beyond the body is waited for, not allocated.
        let mut m = GrpcMessages::default();
        m.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert_eq!(m.count, 1);
    }
}
