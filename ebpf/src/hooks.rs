//! The attached programs, one module per concern.
mod connect;
mod datagram;
mod egress;
mod socket;
mod sticky;
