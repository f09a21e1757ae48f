//! Hardening of the HTTP surface: per-token rate limiting, and the settings for CORS and
//! request timeouts. Security headers are set in `app()`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// HTTP settings of a server.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Sustained requests per second allowed per token (0 disables the limit).
    pub rate_per_second: f64,
    /// Requests a token may make at once before the sustained rate applies.
    pub burst: f64,
    /// Origins allowed to call the API from a browser; empty means CORS is off.
    pub cors_origins: Vec<String>,
    /// Seconds a request may take before it is answered with 408.
    pub timeout_seconds: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            rate_per_second: 200.0,
            burst: 400.0,
            cors_origins: vec![],
            timeout_seconds: 60,
        }
    }
}

/// A token bucket per key (a token's hash), in this process's memory.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` sustained and `burst` at once per key.
    pub fn new(per_second: f64, burst: f64) -> Self {
        RateLimiter {
            per_second,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request for `key`; `Err(seconds)` says when to retry.
    pub fn check(&self, key: &str) -> Result<(), u32> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() > 10_000 {
            // Forget keys that have been idle long enough to be full again.
            let full = self.burst / self.per_second;
            buckets.retain(|_, (_, last)| now.duration_since(*last).as_secs_f64() < full);
        }
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u32)
        }
    }
}
