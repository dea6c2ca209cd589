//! The convolution ops under autodiff: each op runs on the inner backend and records an
//! analytic backward (`dW` and `dx` from the saved input and weight), so every backend with a
//! [`ConvBackend`] gets trainable fast paths.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};

use super::*;

#[derive(Debug)]
struct ConvBackward;

#[derive(Debug, Clone)]
struct ConvState {
    x: Option<NodeId>,
    weight: Option<NodeId>,
    shapes: ([usize; 4], [usize; 4]),
    geom: ConvGeom,
}

impl<B: ConvBackend> Backward<B, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let st = ops.state;
        let x: Option<FloatTensor<B>> = st.x.map(|id| checkpointer.retrieve_node_output(id));
        let w: Option<FloatTensor<B>> = st.weight.map(|id| checkpointer.retrieve_node_output(id));
        let (dx, dw) = B::conv2d_backward(grad, x, w, st.shapes, st.geom);
        if let (Some(node), Some(g)) = (node_x, dx) {
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_w, dw) {
            grads.register::<B>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct MaxPoolBackward;

impl<B: ConvBackend> Backward<B, 1> for MaxPoolBackward {
    /// The input (for its shape) and the positions of the maxima.
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let (x, indices) = ops.state;
            grads.register::<B>(node.id, B::max_pool2x2_backward(x, grad, indices));
        }
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C> {
    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match MaxPoolBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, indices) = B::max_pool2x2_with_indices(x.primitive.clone());
                prep.finish((x.primitive, indices), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::max_pool2x2(x.primitive)),
        }
    }

    fn conv2d_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, geom: ConvGeom) -> FloatTensor<Self> {
        let shapes = (dims4(&x.primitive), dims4(&weight.primitive));
        match ConvBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_needs = !x.node.requirement.is_none();
                let w_needs = !weight.node.requirement.is_none();
                // dW needs x, dx needs W.
                let state = ConvState {
                    x: w_needs.then(|| prep.checkpoint(&x)),
                    weight: x_needs.then(|| prep.checkpoint(&weight)),
                    shapes,
                    geom,
                };
                prep.finish(state, B::conv2d_forward(x.primitive, weight.primitive, geom))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_forward(x.primitive, weight.primitive, geom)),
        }
    }
}
