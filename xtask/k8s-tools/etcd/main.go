// Command etcd is the etcd server at the version pinned in go.mod, built from the Go module proxy
// because `go install go.etcd.io/etcd/server/v3@...` is refused (the module has replace lines).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
