//! The attached programs, one module per concern.
mod connect;
mod datagram;
mod egress;
mod packet;
mod socket;
mod sticky;
