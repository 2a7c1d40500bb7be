"""Process supervision, apart from what the processes do: /proc reading (procfs), a child that ends with
its parent however the parent ends (watchdog), and a real TLS Flower deployment on loopback started and
stopped by pid (loopback). Nothing here imports Flower or the rest of ecgtwin."""
