//! Follows the runner's standard output through Nomad's framed log stream
//! (`/v1/client/fs/logs/{alloc}?follow=true`) and forwards each line as a
//! [`RunnerEvent`], exactly as the local drivers forward the runner's stdout. The bytes
//! read so far are counted, so a dropped stream resumes where it stopped
//! (`origin=start&offset=N`); once the allocation has ended, one last read without
//! `follow` takes what is left, whether or not Nomad closed the followed stream.

use super::api::StreamFrame;
use super::client::NomadClient;
use crate::spec::RunnerEvent;
use base64::Engine;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Pause before a dropped stream is opened again.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// Reads tried for the rest of the log once the allocation has ended.
const FINAL_READS: u32 = 3;

/// One line of the runner's stdout as an event: its own JSON, or a `log` line.
pub fn event_of_line(line: &str) -> RunnerEvent {
    serde_json::from_str::<RunnerEvent>(line).unwrap_or_else(|_| RunnerEvent {
        kind: "log".into(),
        data: serde_json::json!({ "message": line }),
    })
}

/// Splits a byte stream into lines.
#[derive(Default)]
struct Lines(Vec<u8>);

impl Lines {
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.0.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(pos) = self.0.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=pos).collect();
            out.push(String::from_utf8_lossy(&line[..pos]).trim_end().to_string());
        }
        out
    }

    fn rest(&mut self) -> Option<String> {
        let rest = String::from_utf8_lossy(&std::mem::take(&mut self.0))
            .trim_end()
            .to_string();
        (!rest.is_empty()).then_some(rest)
    }
}

/// Decodes concatenated JSON stream frames arriving in arbitrary chunks.
#[derive(Default)]
pub struct FrameDecoder(Vec<u8>);

impl FrameDecoder {
    /// Adds a chunk; returns the data of every frame completed by it.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.0.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut frames = serde_json::Deserializer::from_slice(&self.0).into_iter::<StreamFrame>();
        loop {
            match frames.next() {
                Some(Ok(frame)) => {
                    consumed = frames.byte_offset();
                    if let Some(data) = frame.data.filter(|d| !d.is_empty()) {
                        match base64::engine::general_purpose::STANDARD.decode(data) {
                            Ok(bytes) => out.push(bytes),
                            Err(e) => tracing::warn!(error = %e, "undecodable log frame"),
                        }
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "malformed log stream; skipping what was read");
                    consumed = self.0.len();
                    break;
                }
                None => {
                    consumed = self.0.len();
                    break;
                }
            }
        }
        self.0.drain(..consumed);
        out
    }
}

/// Forwards the task's stdout lines to `events` until `done` turns true and the rest of
/// the log has been read.
pub async fn follow(
    client: NomadClient,
    alloc: String,
    task: &'static str,
    events: mpsc::Sender<RunnerEvent>,
    mut done: watch::Receiver<bool>,
) {
    let mut lines = Lines::default();
    let mut offset: u64 = 0;
    let mut final_reads = 0;
    loop {
        let finished = *done.borrow_and_update();
        if finished {
            final_reads += 1;
        }
        match client.logs(&alloc, task, "stdout", offset, !finished).await {
            Ok(resp) => {
                let mut stream = resp.bytes_stream();
                let mut frames = FrameDecoder::default();
                loop {
                    let chunk = if finished {
                        stream.next().await
                    } else {
                        tokio::select! {
                            c = stream.next() => c,
                            // The allocation ended: read the rest without following.
                            _ = done.changed() => break,
                        }
                    };
                    let Some(Ok(bytes)) = chunk else { break };
                    for data in frames.push(&bytes) {
                        offset += data.len() as u64;
                        for line in lines.push(&data) {
                            if !line.is_empty() && events.send(event_of_line(&line)).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
                if finished {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the sandbox's log yet");
                if finished && final_reads >= FINAL_READS {
                    tracing::warn!(error = %e, "cannot read the end of the sandbox's log");
                    break;
                }
            }
        }
        if !finished {
            // Wait a little, or until the allocation ends.
            let _ = tokio::time::timeout(RECONNECT_DELAY, done.changed()).await;
        }
    }
    if let Some(rest) = lines.rest() {
        let _ = events.send(event_of_line(&rest)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: &str) -> String {
        format!(
            r#"{{"Offset":0,"Data":"{}","File":"alloc/logs/runner.stdout.0"}}"#,
            base64::engine::general_purpose::STANDARD.encode(data)
        )
    }

    #[test]
    fn frames_split_anywhere_are_decoded_once() {
        let stream = format!("{}{{}}{}", frame("a\nb"), frame("c\n"));
        let bytes = stream.as_bytes();
        for cut in 1..bytes.len() {
            let mut d = FrameDecoder::default();
            let mut data = d.push(&bytes[..cut]);
            data.extend(d.push(&bytes[cut..]));
            let all: Vec<u8> = data.concat();
            assert_eq!(all, b"a\nbc\n", "cut at {cut}");
        }
    }

    #[test]
    fn lines_are_joined_across_frames_and_events_parsed() {
        let mut l = Lines::default();
        assert!(l.push(b"{\"kind\":\"x\",").is_empty());
        let got = l.push(b"\"data\":{}}\nplain text\npart");
        assert_eq!(got.len(), 2);
        assert_eq!(event_of_line(&got[0]).kind, "x");
        let plain = event_of_line(&got[1]);
        assert_eq!(plain.kind, "log");
        assert_eq!(plain.data["message"], "plain text");
        assert_eq!(l.rest().as_deref(), Some("part"));
    }
}
