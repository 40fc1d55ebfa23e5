//! The InfluxDB line protocol parser.
