//! List prices of the Claude models, used to follow a run's cost while it streams (the
//! CLI reports the exact cost only at the end). A model it does not know is priced as the
//! most expensive one, so a budget is never overrun by an unknown name.

use crate::stream_json::Usage;

/// Dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

/// Prompt-cache writes cost this much more than input…
const CACHE_WRITE_FACTOR: f64 = 1.25;
/// …and cache reads this fraction of it.
const CACHE_READ_FACTOR: f64 = 0.1;

const OPUS_4_0: Price = Price {
    input: 15.0,
    output: 75.0,
};
const OPUS: Price = Price {
    input: 5.0,
    output: 25.0,
};
const SONNET: Price = Price {
    input: 3.0,
    output: 15.0,
};
const HAIKU_3: Price = Price {
    input: 0.8,
    output: 4.0,
};
const HAIKU: Price = Price {
    input: 1.0,
    output: 5.0,
};

/// The price of a model by its name (`claude-sonnet-4-5`, `claude-opus-4-1-20250805`, …).
pub fn price(model: &str) -> Price {
    let m = model.to_ascii_lowercase();
    let old_opus = ["opus-4-0", "opus-4-1", "opus-4-2025", "3-opus", "opus-3"];
    if m.contains("opus") {
        if old_opus.iter().any(|o| m.contains(o)) {
            OPUS_4_0
        } else {
            OPUS
        }
    } else if m.contains("sonnet") {
        SONNET
    } else if m.contains("haiku") {
        if m.contains("3-5-haiku") || m.contains("haiku-3") || m.contains("3-haiku") {
            HAIKU_3
        } else {
            HAIKU
        }
    } else {
        OPUS_4_0
    }
}

/// What `usage` costs on `model`, in dollars.
pub fn cost_usd(model: &str, usage: &Usage) -> f64 {
    let p = price(model);
    let per_token_in = p.input / 1e6;
    usage.input_tokens as f64 * per_token_in
        + usage.output_tokens as f64 * p.output / 1e6
        + usage.cache_creation_input_tokens as f64 * per_token_in * CACHE_WRITE_FACTOR
        + usage.cache_read_input_tokens as f64 * per_token_in * CACHE_READ_FACTOR
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn matches_what_the_cli_reports() {
        // Claude Code 2.1 reported $0.018 for 3,000 in / 600 out on claude-sonnet-4-5,
        // and $0.001 for 100 in / 20 out on claude-opus-4-8.
        assert!((cost_usd("claude-sonnet-4-5", &usage(3000, 600)) - 0.018).abs() < 1e-9);
        assert!((cost_usd("claude-opus-4-8", &usage(100, 20)) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn unknown_models_are_priced_high() {
        assert_eq!(price("some-new-model"), OPUS_4_0);
        assert_eq!(price("claude-opus-4-1-20250805"), OPUS_4_0);
        assert_eq!(price("claude-haiku-4-5"), HAIKU);
        assert_eq!(price("claude-3-5-haiku-latest"), HAIKU_3);
        let cached = Usage {
            cache_read_input_tokens: 1_000_000,
            cache_creation_input_tokens: 1_000_000,
            ..Usage::default()
        };
        assert!((cost_usd("claude-sonnet-4-5", &cached) - (0.3 + 3.75)).abs() < 1e-9);
    }
}
