// pc-informer (test-only): a client-go shared informer factory on the Secrets and
// ConfigMaps of one namespace, exactly as a controller runs it, with the pod's
// in-cluster configuration. client-go 1.35+ starts such informers with WatchList (one
// watch with sendInitialEvents=true that ends its initial state with a bookmark
// annotated k8s.io/initial-events-end). Prints one JSON line: whether the caches
// synced, how long it took, and what the caches hold.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	clientfeatures "k8s.io/client-go/features"
)

func main() {
	ns := flag.String("namespace", "e2e", "namespace to watch")
	timeout := flag.Duration("timeout", 30*time.Second, "give up syncing after this")
	flag.Parse()
	cfg, err := rest.InClusterConfig()
	if err != nil {
		fail(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fail(err)
	}
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(*ns))
	secrets := factory.Core().V1().Secrets().Informer()
	configmaps := factory.Core().V1().ConfigMaps().Informer()
	stop := make(chan struct{})
	start := time.Now()
	factory.Start(stop)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	synced := cache.WaitForCacheSync(ctx.Done(), secrets.HasSynced, configmaps.HasSynced)
	took := time.Since(start)
	data := map[string]map[string][]byte{}
	for _, o := range secrets.GetStore().List() {
		s := o.(*corev1.Secret)
		data[s.Name] = s.Data
	}
	close(stop)
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{
		"synced":     synced,
		"synced_ms":  took.Milliseconds(),
		"watchlist":  clientfeatures.FeatureGates().Enabled(clientfeatures.WatchListClient),
		"secrets":    data,
		"configmaps": len(configmaps.GetStore().List()),
	})
}

func fail(err error) {
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{"error": err.Error()})
	os.Exit(2)
}
