//! A test sshd on 127.0.0.1 with generated keys (filled in with the transport).
