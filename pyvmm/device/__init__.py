"""pvsched device: the host half of the guest/host handshake and the policy process."""
