"""pvsched host policy: CO-RE BPF programs, their libbpf loader (cffi), the actuator and the engine."""
