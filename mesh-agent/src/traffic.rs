//! Traffic rules compiled from config: VirtualService, ServiceProfile and TrafficSplit
//! routes (`route`), what gateways serve (`gateway`) and DestinationRule policies (`policy`), with the pure decisions
//! made on them (which rule matches, which backend, retry and fault settings). Nothing
//! here does I/O or keeps counters; the L7 proxy in `l7` acts on them.

pub mod external;
pub mod gateway;
pub mod policy;
pub mod route;
