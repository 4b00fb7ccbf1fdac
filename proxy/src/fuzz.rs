//! Generated-input tests of everything that reads bytes a client or an admin-token holder
//! chooses: the startup packet, the frame decoder and the message views, SCRAM's client
//! messages, and the admin API's JSON bodies (issue 14, point 7).
//!
//! Why not cargo-fuzz: the machine's one toolchain is stable, and libFuzzer needs nightly. So
//! each target mutates a corpus of valid inputs (flips, insertions, deletions, truncations,
//! length fields set to edge values, splices) with a seeded generator, and checks that the code
//! returns a typed error or a well-formed value, never panics, and keeps its invariants. CI runs
//! `CHORUS_FUZZ_CASES` cases per target (default 20,000); `bench/fuzz.sh` runs a million.
//! A finding becomes a case in `regressions` below.

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    use crate::protocol::message;
    use crate::protocol::scram::{Binding, ServerExchange, Verifier};
    use crate::protocol::startup::{self, StartupPacket};
    use crate::protocol::FrameCodec;

    /// xorshift64*: deterministic, so a failing case is reproduced from the seed printed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn cases() -> usize {
        std::env::var("CHORUS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
    }

    fn seed() -> u64 {
        std::env::var("CHORUS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x9E37_79B9_7F4A_7C15)
    }

    const EDGE: [u32; 8] = [0, 3, 4, 5, 8, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF];

    /// One to four mutations of a corpus entry, or a splice of two.
    fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut v = corpus[rng.below(corpus.len())].clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(7) {
                0 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = rng.below(v.len() + 1);
                    v.insert(i, rng.next() as u8);
                }
                2 if !v.is_empty() => {
                    v.remove(rng.below(v.len()));
                }
                3 => v.truncate(rng.below(v.len() + 1)),
                4 if v.len() >= 4 => {
                    let i = rng.below(v.len() - 3);
                    v[i..i + 4].copy_from_slice(&EDGE[rng.below(EDGE.len())].to_be_bytes());
                }
                5 => {
                    let other = &corpus[rng.below(corpus.len())];
                    let cut = rng.below(other.len() + 1);
                    v.extend_from_slice(&other[cut..]);
                }
                _ => {
                    let i = rng.below(v.len() + 1);
                    let junk: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                    v.splice(i..i, junk);
                }
            }
        }
        v
    }

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn startup_packets() {
        let corpus = vec![
            packet(196_608, b"user\0app\0database\0db\0application_name\0psql\0\0"),
            packet(196_610, b"user\0app\0_pq_.x\0y\0\0"),
            packet(80_877_103, b""),
            packet(80_877_104, b""),
            packet(80_877_102, &[0, 0, 0, 5, 0, 0, 0, 9]),
            packet(196_608, b"user\0\0"),
        ];
        let mut rng = Rng(seed());
        let mut parsed = 0;
        for _ in 0..cases() {
            let body = mutate(&mut rng, &corpus);
            if let Ok(StartupPacket::Startup { params, .. }) = startup::parse(&body) {
                parsed += 1;
                assert!(params.iter().all(|(k, v)| !k.contains('\0') && !v.contains('\0')), "{body:?}");
            }
            let len = u32::from_be_bytes([rng.next() as u8, rng.next() as u8, rng.next() as u8, rng.next() as u8]);
            if let Ok(n) = startup::check_length(len) {
                assert!((8..=10_000).contains(&n), "{len}");
            }
        }
        assert!(parsed > cases() / 20, "{parsed} of {} startup packets parsed", cases());
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = vec![tag];
        b.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn the_frame_decoder_and_the_message_views() {
        let corpus = vec![
            [frame(b'Q', b"SELECT 1\0"), frame(b'X', b"")].concat(),
            [frame(b'P', b"s1\0SELECT $1\0\0\x01\0\0\0\x17"), frame(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"), frame(b'S', b"")]
                .concat(),
            frame(b'E', b"SFATAL\0C08P01\0Mbad\0\0"),
            frame(b'D', b"\0\x01\0\0\0\x0eread committed"),
            frame(b'p', b"SCRAM-SHA-256\0\0\0\0\x20n,,n=,r=abcdefghijklmnopqrstuvwx"),
            frame(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            frame(b'K', b"\0\0\0\x01\0\0\0\x02"),
            frame(b'd', &[7u8; 300]),
        ];
        let mut rng = Rng(seed() ^ 1);
        let mut frames = 0;
        for _ in 0..cases() {
            let input = mutate(&mut rng, &corpus);
            let max = [64usize, 1024, 1 << 20][rng.below(3)];
            let mut codec = FrameCodec::new(max);
            let mut buf = BytesMut::from(&input[..]);
            let mut consumed = 0;
            while let Ok(Some(f)) = codec.decode(&mut buf) {
                let declared = u32::from_be_bytes([f.data[1], f.data[2], f.data[3], f.data[4]]) as usize;
                assert_eq!(f.data.len(), declared + 1);
                assert!(f.data.len() <= max);
                consumed += f.data.len();
                frames += 1;
                let body = f.body();
                let _ = message::error_fields(body);
                let _ = message::data_row_first(body);
                let _ = message::authentication(body);
                let _ = message::sasl_initial_response(body);
                let _ = message::backend_key_data(body);
                let _ = crate::sql::text::statement_text(&f.data.clone().freeze());
            }
            assert!(consumed <= input.len());
        }
        assert!(frames > cases() / 4, "{frames} frames decoded in {} inputs", cases());
    }

    #[test]
    fn scram_client_messages() {
        let verifier = Verifier::from_password("secret");
        let data = [9u8; 32];
        let firsts = vec![
            b"n,,n=,r=rOprNGfwEbeRWgbNEkqO".to_vec(),
            b"y,,n=app,r=abc".to_vec(),
            b"p=tls-server-end-point,,n=,r=xyz".to_vec(),
        ];
        let finals = vec![
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".to_vec(),
            b"c=eSws,r=abc,p=AAAA".to_vec(),
        ];
        let mut rng = Rng(seed() ^ 2);
        let mut started = 0;
        for _ in 0..cases() {
            let first = mutate(&mut rng, &firsts);
            let binding = match rng.below(3) {
                0 => Binding::None { plus_offered: false },
                1 => Binding::None { plus_offered: true },
                _ => Binding::EndPoint(&data),
            };
            let Ok((ex, server_first)) = ServerExchange::start(&verifier, &first, binding) else { continue };
            started += 1;
            assert!(server_first.starts_with("r=") && server_first.contains(",s=") && server_first.contains(",i="));
            // Without the password no final message passes: generated ones, including ones
            // that carry the server's nonce.
            let nonce = server_first.split(',').next().unwrap_or_default().to_string();
            let mut last = mutate(&mut rng, &finals);
            if rng.below(2) == 0 {
                last = format!("c=biws,{nonce},p={}", String::from_utf8_lossy(&last)).into_bytes();
            }
            assert!(ex.finish(&last).is_err(), "{:?}", String::from_utf8_lossy(&last));
        }
        // The mutations keep enough inputs valid to reach the final message's checks.
        assert!(started > cases() / 20, "{started} of {} exchanges started", cases());
    }

    #[test]
    fn admin_api_bodies() {
        let corpus = vec![
            br#"{"name":"pg3","host":"127.0.0.1","port":5432,"method":"detach","donor":"pg1","force":false,"skip_verify":false}"#
                .to_vec(),
            br#"{"name":"a","host":"h","port":1}"#.to_vec(),
            br#"{"databases":["postgres","app"]}"#.to_vec(),
            br#"{}"#.to_vec(),
        ];
        let mut rng = Rng(seed() ^ 3);
        let mut read = 0;
        for _ in 0..cases() {
            let body = mutate(&mut rng, &corpus);
            if let Ok(req) = serde_json::from_slice::<crate::join::JoinRequest>(&body) {
                read += 1;
                // The name is checked before it touches a path or a state file.
                let _ = crate::config::valid_backend_name(&req.name);
            }
            let _ = serde_json::from_slice::<crate::admin::VerifyBody>(&body);
        }
        assert!(read > cases() / 100, "{read} of {} join bodies read", cases());
    }

    /// Findings, each kept as a case of its own.
    #[test]
    fn regressions() {
        // None yet: every run of a million cases per target so far ended clean.
        assert!(startup::parse(&[]).is_err());
        assert!(FrameCodec::new(64).decode(&mut BytesMut::from(&b"Q\xff\xff\xff\xff"[..])).is_err());
    }
}
