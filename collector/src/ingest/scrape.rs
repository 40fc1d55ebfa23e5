//! Scraping Prometheus exporters: the collector fetches `scrape_targets` every `pull_interval_secs`.

/// Checks a scrape target URL (`http://host:port/path`). Returns why it is not one.
pub fn validate_scrape_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") {
        Ok(())
    } else {
        Err(format!("{url:?} does not start with http://"))
    }
}

/// What the API shows of scraping (targets and their health). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ScrapeHandle {}

/// Scrapes every target on schedule.
#[derive(Debug)]
pub struct Scraper {}

impl Scraper {
    pub fn new(_store: crate::store::Store, _config: &crate::config::CollectorConfig) -> Scraper {
        Scraper {}
    }

    pub fn handle(&self) -> ScrapeHandle {
        ScrapeHandle {}
    }

    /// Scrapes until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
    }
}
