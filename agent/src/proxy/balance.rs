//! Balancing state that outlives config updates, and its only owner: round-robin positions,
//! requests in flight per endpoint (LEAST_REQUEST), outlier ejections, and connection-pool
//! admission per cluster (a destination service port and subset).
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use hyper::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::info;

use crate::{
    http_route::{Lb, Outlier, PoolLimits},
    state::{Candidate, Target},
};

#[derive(Default)]
struct Health {
    consecutive_5xx: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

struct Pool {
    active: Arc<Semaphore>,
    pending: AtomicU32,
}

/// The connection pool is full and so is its queue.
#[derive(Debug)]
pub struct Overflow;

#[derive(Default)]
pub struct Balancer {
    rr: Mutex<HashMap<String, usize>>,
    in_flight: Arc<Mutex<HashMap<SocketAddr, u32>>>,
    health: Mutex<HashMap<SocketAddr, Health>>,
    pools: Mutex<HashMap<(String, PoolLimits), Arc<Pool>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Balancer {
    /// One endpoint for a request: ejected outliers left out (at most `maxEjectionPercent` of
    /// them, at least one), then consistent hash on the header if set and present, else the
    /// load-balancing policy.
    pub fn choose<'a>(&self, d: &'a Target, headers: &HeaderMap) -> &'a Candidate {
        let now = Instant::now();
        let mut pool: Vec<&Candidate> = d.candidates.iter().collect();
        if let Some(o) = d.traffic.outlier {
            let health = lock(&self.health);
            let allowed = (pool.len() * o.max_ejection_percent as usize / 100).max(1);
            let mut ejected = 0;
            pool.retain(|c| {
                let out = health
                    .get(&c.addr)
                    .and_then(|h| h.ejected_until)
                    .is_some_and(|t| t > now);
                if out && ejected < allowed {
                    ejected += 1;
                    return false;
                }
                true
            });
            if pool.is_empty() {
                pool = d.candidates.iter().collect();
            }
        }
        if let Some(value) = d
            .traffic
            .hash_header
            .as_ref()
            .and_then(|h| headers.get(h.as_str()))
        {
            pool.sort_by_key(|c| c.addr);
            let mut h = std::collections::hash_map::DefaultHasher::new();
            value.as_bytes().hash(&mut h);
            return pool[(h.finish() % pool.len() as u64) as usize];
        }
        let next = || {
            let mut rr = lock(&self.rr);
            let n = rr.entry(d.cluster.clone()).or_default();
            *n = n.wrapping_add(1);
            *n
        };
        match d.traffic.lb {
            Lb::Random => pool[fastrand::usize(..pool.len())],
            Lb::RoundRobin => pool[next() % pool.len()],
            Lb::LeastRequest => {
                let start = next();
                let in_flight = lock(&self.in_flight);
                (0..pool.len())
                    .map(|i| pool[(start + i) % pool.len()])
                    .min_by_key(|c| in_flight.get(&c.addr).copied().unwrap_or(0))
                    .expect("candidates are never empty")
            }
        }
    }

    /// Counts a request in flight to `addr` until the guard drops.
    pub fn start(&self, addr: SocketAddr) -> InFlight {
        *lock(&self.in_flight).entry(addr).or_default() += 1;
        InFlight {
            addr,
            map: self.in_flight.clone(),
        }
    }

    /// The outcome of a request to `addr`: consecutive 5xx (or failures to connect) eject it
    /// for `baseEjectionTime` times the number of times it has been ejected.
    pub fn record(&self, addr: SocketAddr, outlier: Option<Outlier>, failed: bool) {
        let Some(o) = outlier else {
            return;
        };
        let mut health = lock(&self.health);
        let h = health.entry(addr).or_default();
        if !failed {
            h.consecutive_5xx = 0;
            return;
        }
        h.consecutive_5xx += 1;
        if h.consecutive_5xx >= o.consecutive_5xx {
            h.consecutive_5xx = 0;
            h.ejections += 1;
            let time = o.base_ejection * h.ejections;
            h.ejected_until = Some(Instant::now() + time);
            info!(endpoint = %addr, ejected_for = ?time, "outlier ejected");
        }
    }

    /// Admission to `cluster`'s pool: a permit (held while the request is in flight), a wait in
    /// its queue, or `Overflow` when the queue is full too.
    pub async fn admit(
        &self,
        cluster: &str,
        limits: Option<PoolLimits>,
    ) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(limits) = limits.filter(|l| l.max_active > 0) else {
            return Ok(None);
        };
        let pool = lock(&self.pools)
            .entry((cluster.to_owned(), limits))
            .or_insert_with(|| {
                Arc::new(Pool {
                    active: Arc::new(Semaphore::new(limits.max_active as usize)),
                    pending: AtomicU32::new(0),
                })
            })
            .clone();
        if let Ok(p) = pool.active.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        if pool.pending.fetch_add(1, Ordering::SeqCst) >= limits.max_pending {
            pool.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(Overflow);
        }
        let permit = pool.active.clone().acquire_owned().await;
        pool.pending.fetch_sub(1, Ordering::SeqCst);
        Ok(permit.ok())
    }
}

pub struct InFlight {
    addr: SocketAddr,
    map: Arc<Mutex<HashMap<SocketAddr, u32>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.map).get_mut(&self.addr) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{http_route::TrafficPolicy, state::Workload};

    fn decision(lb: Lb, outlier: Option<Outlier>) -> Target {
        let candidate = |ip: &str| Candidate {
            addr: format!("{ip}:80").parse().unwrap(),
            workload: Arc::new(Workload::new(ip, "shop", None, "n", &Default::default())),
        };
        Target {
            cluster: "shop/web:80/".into(),
            service: "web.shop.svc.cluster.local".into(),
            envoy_cluster: "outbound|80||web.shop.svc.cluster.local".into(),
            candidates: vec![candidate("10.0.0.1"), candidate("10.0.0.2")],
            traffic: TrafficPolicy {
                lb,
                outlier,
                ..Default::default()
            },
            http2: false,
        }
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let b = Balancer::default();
        let d = decision(Lb::LeastRequest, None);
        let busy = b.start(d.candidates[0].addr);
        for _ in 0..10 {
            assert_eq!(b.choose(&d, &HeaderMap::new()).addr, d.candidates[1].addr);
        }
        drop(busy);
        let mut seen: Vec<SocketAddr> = (0..4)
            .map(|_| b.choose(&d, &HeaderMap::new()).addr)
            .collect();
        seen.dedup();
        assert!(seen.len() > 1, "idle endpoints share the load");
    }

    #[test]
    fn consecutive_failures_eject_and_ejection_ends() {
        let b = Balancer::default();
        let o = Outlier {
            consecutive_5xx: 2,
            base_ejection: Duration::from_millis(100),
            max_ejection_percent: 50,
        };
        let d = decision(Lb::RoundRobin, Some(o));
        let bad = d.candidates[0].addr;
        b.record(bad, Some(o), true);
        b.record(bad, Some(o), false); // a success resets the count
        b.record(bad, Some(o), true);
        assert!(
            (0..4).any(|_| b.choose(&d, &HeaderMap::new()).addr == bad),
            "not ejected yet"
        );
        b.record(bad, Some(o), true);
        assert!(
            (0..10).all(|_| b.choose(&d, &HeaderMap::new()).addr != bad),
            "ejected"
        );
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            (0..4).any(|_| b.choose(&d, &HeaderMap::new()).addr == bad),
            "back after the ejection time"
        );
    }
}
