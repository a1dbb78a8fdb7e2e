// Command etcd is upstream's etcd main, built from the published
// go.etcd.io/etcd/server/v3 module (see testenv/build).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
