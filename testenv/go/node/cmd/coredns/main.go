// Command coredns is CoreDNS with only the plugins the single-node test cluster uses: the
// kubernetes plugin answers for Services and pods, nothing is forwarded (no packet may leave
// the cluster's network namespace), so the dozens of cloud plugins of the stock build are left
// out. Built from the published github.com/coredns/coredns module (see testenv/build-node).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins below register themselves; their order in `directives` is the chain order.
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

var directives = []string{"errors", "health", "ready", "kubernetes"}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
